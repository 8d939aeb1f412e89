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
    for index, token in enumerate(tokens):
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
    assert html.count("background:#e6e6e6;margin") == len(enc["input_ids"]) - sum(enc["assistant_mask"])
