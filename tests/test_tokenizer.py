"""The BPE tokenizer and its chat template's assistant mask, token by token."""

import pytest

from companion.tokenizer import (
    ASSISTANT, END_OF_TURN, IMAGE_TOKEN, USER, encode_chat, load_tokenizer, train_tokenizer,
)

TEXTS = [
    "There is one red circle at the top left.",
    "How many circles are there?",
    'The word is "CAT".',
    "Where is the blue square?",
    "The blue square is at the center.",
] * 10

CONVERSATION = [
    {"from": "human", "value": "<image>\nHow many circles are there?"},
    {"from": "gpt", "value": "There is one red circle."},
    {"from": "human", "value": "Where is the blue square?"},
    {"from": "gpt", "value": "The blue square is at the center."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


def test_training_is_deterministic(tokenizer):
    again = train_tokenizer(TEXTS, vocab_size=300)
    assert again.get_vocab() == tokenizer.get_vocab()


def test_special_tokens_are_single_tokens(tokenizer):
    for special in (IMAGE_TOKEN, USER, ASSISTANT, END_OF_TURN):
        ids = tokenizer.encode(special, add_special_tokens=False)
        assert len(ids) == 1, special
    assert tokenizer.pad_token_id is not None


def test_assistant_mask_token_by_token(tokenizer):
    enc = encode_chat(tokenizer, CONVERSATION)
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"])
    mask = enc["assistant_mask"]
    # Rebuild, independently of the template, which spans are assistant text.
    masked_text = tokenizer.decode([i for i, m in zip(enc["input_ids"], mask) if m])
    assert masked_text == ("There is one red circle." + END_OF_TURN
                           + "The blue square is at the center." + END_OF_TURN)
    # Walk the sequence: every token between "<|assistant|>\n" and its "<|end|>" (inclusive)
    # is 1; everything else (user text, image token, role tokens, newlines) is 0.
    inside, expected = False, []
    for token in tokens:
        if token == ASSISTANT:
            expected.append(0)
            inside = "pending"
            continue
        if inside == "pending":  # the newline after the role token
            expected.append(0)
            inside = True
            continue
        if inside is True:
            expected.append(1)
            if token == END_OF_TURN:
                inside = False
            continue
        expected.append(0)
    assert mask == expected
    assert tokens[0] == USER and IMAGE_TOKEN in tokens
    assert mask[tokens.index(IMAGE_TOKEN)] == 0


def test_single_turn_and_generation_prompt(tokenizer):
    enc = encode_chat(tokenizer, CONVERSATION[:2])
    assert sum(enc["assistant_mask"]) == len(
        tokenizer.encode("There is one red circle.", add_special_tokens=False)) + 1
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
        tokenize=False, add_generation_prompt=True)
    assert prompt == f"{USER}\n{IMAGE_TOKEN}\nHi{END_OF_TURN}\n{ASSISTANT}\n"


def test_save_and_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert encode_chat(loaded, CONVERSATION) == encode_chat(tokenizer, CONVERSATION)
    assert loaded.chat_template == tokenizer.chat_template


def test_errors(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="vocab_size=10 is too small"):
        train_tokenizer(TEXTS, vocab_size=10)
    with pytest.raises(ValueError, match="got no texts"):
        train_tokenizer([], vocab_size=300)
    with pytest.raises(FileNotFoundError, match="no tokenizer there"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"conversations\[1\]\['from'\] is 'bot'"):
        encode_chat(tokenizer, [CONVERSATION[0], {"from": "bot", "value": "x"}])


def test_assistant_mask_html_colours_exactly_the_loss_tokens(tokenizer):
    from companion.tokenizer import assistant_mask_html

    enc = encode_chat(tokenizer, CONVERSATION)
    html = assistant_mask_html(tokenizer, enc)
    assert html.count("background:#b7e4b0;margin") == sum(enc["assistant_mask"])
    assert (html.count("background:#e6e6e6;margin")
            == len(enc["input_ids"]) - sum(enc["assistant_mask"]))


# ----------------------------------------------------------------- checkpoints' own tokenizers

def _mask_from_characters(tokenizer, text: str, spans: list[str]) -> list[int]:
    """Reference mask from character offsets: a token is 1 when it lies inside one of the
    ``spans`` (located in order in ``text``); independent of the template machinery."""
    ranges, cursor = [], 0
    for span in spans:
        start = text.index(span, cursor)
        ranges.append((start, start + len(span)))
        cursor = start + len(span)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [int(any(a <= s and e <= b for a, b in ranges) and e > s)
            for s, e in encoded["offset_mapping"]]


def test_a_template_without_generation_blocks_masks_each_reply_and_its_end_token():
    from foreign_tokenizers import CHATML, foreign_tokenizer

    from companion.tokenizer import has_generation_markers, prepare_tokenizer

    tokenizer = foreign_tokenizer(CHATML)
    assert not has_generation_markers(tokenizer)
    prepare_tokenizer(tokenizer)
    enc = encode_chat(tokenizer, CONVERSATION)
    text = tokenizer.apply_chat_template(
        [{"role": r, "content": t["value"]} for r, t in zip(
            ["user", "assistant"] * 2, CONVERSATION)], tokenize=False)
    assert tokenizer.decode(enc["input_ids"]) == text
    assert enc["assistant_mask"] == _mask_from_characters(tokenizer, text, [
        "There is one red circle.<|im_end|>", "The blue square is at the center.<|im_end|>"])
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"])
    assert tokens.count(IMAGE_TOKEN) == 1 and enc["assistant_mask"][tokens.index(IMAGE_TOKEN)] == 0
    # the newline after <|im_end|> and the next turn's header carry no loss
    ends = [i for i, t in enumerate(tokens) if t == "<|im_end|>"]
    assert [enc["assistant_mask"][i] for i in ends] == [0, 1, 0, 1]
    assert all(enc["assistant_mask"][i + 1] == 0 for i in ends)


def test_a_tokenizer_without_template_gets_llava_v1_and_its_eos_ends_each_reply():
    from foreign_tokenizers import foreign_tokenizer

    from companion.tokenizer import LLAVA_V1_SYSTEM, LLAVA_V1_TEMPLATE, prepare_tokenizer
    from companion.tokenizer import end_of_turn_id

    tokenizer = foreign_tokenizer(None)
    assert tokenizer.pad_token is None and IMAGE_TOKEN not in tokenizer.get_vocab()
    assert prepare_tokenizer(tokenizer) == 1 and prepare_tokenizer(tokenizer) == 0
    assert tokenizer.chat_template == LLAVA_V1_TEMPLATE and tokenizer.pad_token == "<|endoftext|>"
    assert len(tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)) == 1
    enc = encode_chat(tokenizer, CONVERSATION[:2])
    text = tokenizer.decode(enc["input_ids"])
    assert text == (f"{LLAVA_V1_SYSTEM} USER: <image>\nHow many circles are there? "
                    "ASSISTANT: There is one red circle.<|endoftext|>")
    assert enc["assistant_mask"] == _mask_from_characters(
        tokenizer, text, [" There is one red circle.<|endoftext|>"])
    assert end_of_turn_id(tokenizer) == tokenizer.eos_token_id


def test_end_of_turn_comes_from_the_template(tokenizer):
    from foreign_tokenizers import CHATML, foreign_tokenizer

    from companion.tokenizer import end_of_turn_id

    chatml = foreign_tokenizer(CHATML)
    assert chatml.convert_ids_to_tokens(end_of_turn_id(chatml)) == "<|im_end|>"
    assert tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer)) == END_OF_TURN


def test_a_template_that_rewrites_earlier_replies_is_refused_with_the_fix():
    from foreign_tokenizers import REWRITING, foreign_tokenizer

    tokenizer = foreign_tokenizer(REWRITING)
    assert encode_chat(tokenizer, CONVERSATION[:2])["assistant_mask"].count(1) > 0
    with pytest.raises(ValueError, match=r"renders turn 1 differently.*\{% generation %\}"):
        encode_chat(tokenizer, CONVERSATION)


def test_a_checkpoints_lm_gets_the_image_token_and_grown_embeddings(tmp_path):
    from foreign_tokenizers import save_foreign_lm

    from companion.lm import build_lm
    from companion.tokenizer import image_token_id

    save_foreign_lm(tmp_path / "lm")
    model, tokenizer = build_lm(checkpoint=str(tmp_path / "lm"))
    assert image_token_id(tokenizer) == 400 and len(tokenizer) == 401
    assert model.get_input_embeddings().weight.shape[0] == 401
    assert model.get_output_embeddings().weight.shape[0] == 401
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_an_empty_reply_is_its_end_of_turn_token_alone():
    from foreign_tokenizers import CHATML, foreign_tokenizer

    from companion.tokenizer import prepare_tokenizer

    tokenizer = foreign_tokenizer(CHATML)
    prepare_tokenizer(tokenizer)
    enc = encode_chat(tokenizer, [CONVERSATION[0], {"from": "gpt", "value": ""}])
    masked = [t for t, m in zip(tokenizer.convert_ids_to_tokens(enc["input_ids"]),
                                enc["assistant_mask"]) if m]
    assert masked == ["<|im_end|>"]
