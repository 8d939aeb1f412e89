"""A small BPE tokenizer trained on the shapes world's text, wrapped as a transformers tokenizer.

The chat template marks assistant replies with ``{% generation %}`` blocks, so
``apply_chat_template(..., return_assistant_tokens_mask=True)`` tells which tokens are the
assistant's: exactly the tokens that carry loss in instruction tuning (3.2). The end-of-turn
token of an assistant reply is inside the block, so the model learns to stop.

Conversation layout (one line per turn)::

    <|user|>\\n<image>\\nHow many circles are there?<|end|>\\n
    <|assistant|>\\n[There is one circle.<|end|>]\\n      <- [...] is the assistant mask

A checkpoint's own tokenizer keeps its own chat template. Most real templates have no
``{% generation %}`` blocks; :func:`encode_chat` then finds each assistant reply by rendering
the conversation up to that reply (with the generation prompt) and up to its end, and takes
the tokens in between, cut after the reply's end-of-turn token. A tokenizer with no template
at all gets LLaVA-1.5's own conversation format (:data:`LLAVA_V1_TEMPLATE`), and
:func:`prepare_tokenizer` adds the ``<image>`` token and a pad token where they are missing.
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Iterable
from html import escape
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from companion.artifacts import cached_artifact
from companion.data.llava import IMAGE_PLACEHOLDER
from companion.world import TASK_TYPES, make_instruction_dataset, make_scenes, scene_captions

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
IMAGE_TOKEN = IMAGE_PLACEHOLDER  # the data's <image> placeholder is one special token
USER, ASSISTANT, SYSTEM, END_OF_TURN = "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"
# Order fixes the ids: pad 0, unk 1, bos 2, eos 3. (Hugging Face's CLIP text model treats
# eos_token_id == 2 as a legacy config and pools at argmax(input_ids) instead of at the eos.)
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, IMAGE_TOKEN, USER, ASSISTANT, SYSTEM, END_OF_TURN]

# Message content may be a string (LLaVA JSON: "<image>\n..." inline) or a list of
# {"type": "image"} / {"type": "text", "text": ...} parts (the transformers processor style);
# both templates below first turn it into the string ``content``.
_CONTENT = (
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set content = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set content.text = content.text + '<image>\n' -%}"
    "{%- else -%}{%- set content.text = content.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set content = content.text -%}{%- endif -%}"
)
_UNKNOWN_ROLE = (
    "{{ raise_exception('unknown role ' + message['role'] + "
    "'; expected user, assistant or system') }}"
)
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    + _CONTENT +
    "{%- if message['role'] == 'user' -%}"
    "{{ '<|user|>\n' + content + '<|end|>\n' }}"
    "{%- elif message['role'] == 'system' -%}"
    "{{ '<|system|>\n' + content + '<|end|>\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ content + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    + _UNKNOWN_ROLE +
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


# LLaVA-1.5's conversation format ("vicuna_v1"): "SYSTEM USER: <image>\nQ ASSISTANT: A</s>USER: ..."
# for tokenizers that bring no template. The reply starts with the space after "ASSISTANT:",
# so the generation prompt ends at the colon and the prompt is a prefix of the full text.
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's "
                   "questions.")
LLAVA_V1_TEMPLATE = (
    "{%- for message in messages -%}"
    + _CONTENT +
    "{%- if loop.first and message['role'] != 'system' -%}{{ \""
    + LLAVA_V1_SYSTEM +
    " \" }}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{ content + ' ' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' + content + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'ASSISTANT:' }}{% generation %}{{ ' ' + content + eos_token }}{% endgeneration %}"
    "{%- else -%}"
    + _UNKNOWN_ROLE +
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 600, min_frequency: int = 2):
    """Train a byte-level BPE on ``texts`` and return a ``PreTrainedTokenizerFast``.

    Byte-level pre-tokenisation means any string can be encoded (no unknown characters),
    as in GPT-2; the world's small closed vocabulary makes most words single tokens.
    Training is deterministic for the same texts in the same order.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte tokens plus "
            f"{len(SPECIAL_TOKENS)} special tokens; use at least {len(SPECIAL_TOKENS) + 256}"
        )
    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer got no texts; pass the world's captions and dialogues")
    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(core)


def wrap_tokenizer(core):
    """Wrap a ``tokenizers.Tokenizer`` with the special tokens and the chat template."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="right",
        model_max_length=4096,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [USER, ASSISTANT, SYSTEM, END_OF_TURN]}
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(path: str | os.PathLike):
    """Load a tokenizer saved with ``save_pretrained`` (ours or any checkpoint's)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no tokenizer there; train one with train_tokenizer()")
    return AutoTokenizer.from_pretrained(str(path))


def to_chat_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns (``from``/``value``) to chat messages (``role``/``content``)."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
             "system": "system"}
    messages = []
    for index, turn in enumerate(conversations):
        role = roles.get(turn.get("from"))
        if role is None:
            raise ValueError(
                f"conversations[{index}]['from'] is {turn.get('from')!r}; expected human, gpt "
                "or assistant"
            )
        messages.append({"role": role, "content": turn["value"]})
    return messages


def has_generation_markers(tokenizer) -> bool:
    """Whether the tokenizer's chat template marks assistant text with ``{% generation %}``."""
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default one is used
        template = template.get("default", "")
    return bool(template) and re.search(r"{%-?\s*generation\s*-?%}", template) is not None


def prepare_tokenizer(tokenizer) -> int:
    """Make any checkpoint's tokenizer usable for LLaVA training, in place.

    Adds ``<image>`` as a special token when it is missing, uses eos as the pad token when
    there is none, and gives a tokenizer without a chat template LLaVA-1.5's format
    (:data:`LLAVA_V1_TEMPLATE`). Returns how many tokens were added: the caller must grow the
    model's embeddings to ``len(tokenizer)`` (:func:`fit_embeddings`).
    """
    added = 0
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id is None or image_id == tokenizer.unk_token_id:
        added += tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)],
                                      special_tokens=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; give it a pad "
                             "token (tokenizer.pad_token = ...) before training")
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has no chat template and no eos token to end a "
                             "reply; set tokenizer.chat_template (with {% generation %} blocks)")
        tokenizer.chat_template = LLAVA_V1_TEMPLATE
    return added


def _render_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              add_generation_prompt=add_generation_prompt
                                              )["input_ids"])


def _control_ids(tokenizer) -> set[int]:
    """Special and added tokens: the kind of token a template ends a turn with."""
    ids = set(tokenizer.all_special_ids)
    ids.update(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    return ids


def _reply_tokens(tokenizer, messages: list[dict], index: int) -> tuple[int, list[int]]:
    """``(start, ids)``: ``ids`` renders ``messages[:index + 1]``; the assistant message
    ``messages[index]`` begins at ``start``, the length of ``messages[:index]`` rendered with
    the generation prompt. Raises a clear error when that prompt is not a prefix of the
    rendered reply (the positions would not line up)."""
    if messages[index]["role"] != "assistant":
        raise ValueError(f"messages[{index}] is a {messages[index]['role']!r} turn, not an "
                         "assistant reply")
    before = _render_ids(tokenizer, messages[:index], add_generation_prompt=True) if index else []
    through = _render_ids(tokenizer, messages[:index + 1])
    if through[:len(before)] != before:
        raise ValueError(
            f"the tokenizer's chat template does not render turn {index} as a continuation of "
            "the turns before it (the generation prompt is not a prefix of the full text), so "
            "the assistant tokens cannot be found; give the tokenizer a template with "
            "{% generation %} blocks (tokenizer.chat_template = ...)")
    return len(before), through


def template_end_of_turn(tokenizer) -> int | None:
    """The token the chat template ends an assistant reply with: the first special or added
    token after the text of a rendered reply, or None when the template writes none."""
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Yes"}]
    start, ids = _reply_tokens(tokenizer, messages, 1)
    controls, seen_text = _control_ids(tokenizer), False
    for token in ids[start:]:
        if token in controls and seen_text:
            return token
        seen_text = seen_text or token not in controls
    return None


def _span(tokenizer, messages: list[dict], index: int, end_token: int | None):
    """``(start, end, ids)``: :func:`reply_span`'s positions and the rendering they index."""
    start, ids = _reply_tokens(tokenizer, messages, index)
    if end_token is not None and end_token in ids[start:]:
        return start, ids.index(end_token, start) + 1, ids
    return start, len(ids), ids


def reply_span(tokenizer, messages: list[dict], index: int) -> tuple[int, int]:
    """``(start, end)`` token positions of the assistant message ``messages[index]`` in the
    rendering of ``messages[:index + 1]``, found without ``{% generation %}`` markers: from
    the end of the generation prompt to just after the reply's end-of-turn token
    (:func:`template_end_of_turn`; an empty reply is that token alone), or to the end of the
    turn's text when the template writes none."""
    start, end, _ = _span(tokenizer, messages, index, template_end_of_turn(tokenizer))
    return start, end


def encode_chat(tokenizer, conversations: list[dict]) -> dict:
    """Token ids and assistant mask of a LLaVA conversation through the chat template.

    Returns ``{"input_ids": list[int], "assistant_mask": list[int]}`` where the mask is 1
    exactly on assistant reply tokens and their end-of-turn token. A template with
    ``{% generation %}`` blocks says which tokens those are; for any other template they are
    found turn by turn with :func:`reply_span`.
    """
    messages = to_chat_messages(conversations)
    if has_generation_markers(tokenizer):
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        return {"input_ids": list(encoded["input_ids"]),
                "assistant_mask": list(encoded["assistant_masks"])}
    ids = _render_ids(tokenizer, messages)
    mask = [0] * len(ids)
    end_token = template_end_of_turn(tokenizer)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end, through = _span(tokenizer, messages, index, end_token)
        if ids[:end] != through[:end]:
            raise ValueError(
                f"the tokenizer's chat template renders turn {index} differently once later "
                "turns follow it, so the assistant tokens cannot be found; give the tokenizer "
                "a template with {% generation %} blocks (tokenizer.chat_template = ...)")
        mask[start:end] = [1] * (end - start)
    return {"input_ids": ids, "assistant_mask": mask}


def world_corpus(n_scenes: int = 2000, seed: int = 12345) -> list[str]:
    """Text of the shapes world the tokenizer is trained on: every caption phrasing and
    every turn of instruction samples of all six task types."""
    scenes = make_scenes(n_scenes, seed=seed)
    texts = [caption for scene in scenes for caption in scene_captions(scene)]
    records = make_instruction_dataset(scenes, tasks=TASK_TYPES, samples_per_scene=1, seed=seed)
    texts += [turn["value"] for record in records for turn in record["conversations"]]
    return texts


def world_tokenizer(cache_dir: str | os.PathLike, vocab_size: int = 600,
                    n_scenes: int = 2000, seed: int = 12345, log=print):
    """The world's tokenizer, trained once and cached (keyed by its config)."""
    config = {"kind": "world-bpe", "vocab_size": vocab_size, "n_scenes": n_scenes,
              "seed": seed, "template": CHAT_TEMPLATE, "specials": SPECIAL_TOKENS}

    def build(folder):
        train_tokenizer(world_corpus(n_scenes, seed), vocab_size=vocab_size).save_pretrained(folder)

    return load_tokenizer(cached_artifact(cache_dir, "tokenizer", config, build, log=log))


def assistant_mask_html(tokenizer, encoded: dict) -> str:
    """HTML of a tokenised conversation: tokens that carry loss green, the rest grey."""
    spans = []
    for token_id, in_loss in zip(encoded["input_ids"], encoded["assistant_mask"]):
        text = tokenizer.decode([token_id]).replace("\n", "⏎")
        colour = "#b7e4b0" if in_loss else "#e6e6e6"
        spans.append(
            f'<span style="background:{colour};margin:1px;padding:1px 2px;border-radius:3px;'
            f'font-family:monospace;white-space:pre">{escape(text)}</span>')
    legend = ('<p><span style="background:#b7e4b0;padding:1px 4px">assistant: label = token</span> '
              '<span style="background:#e6e6e6;padding:1px 4px">everything else: label = -100'
              '</span></p>')
    return legend + '<div style="line-height:2">' + "".join(spans) + "</div>"


# ----------------------------------------------------------------------------- model-side ids

def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant reply: ``<|end|>`` for the world's tokenizer, else
    the token the chat template closes a reply with (``<|im_end|>``, ``<|eot_id|>``...),
    else eos (LLaVA-1.5's ``</s>``)."""
    ids = tokenizer.convert_tokens_to_ids([END_OF_TURN])
    if ids and ids[0] is not None and ids[0] != tokenizer.unk_token_id:
        return int(ids[0])
    # rendering the template costs a few hundred microseconds and decoding asks for every
    # reply, so the answer is kept per tokenizer object, for its current template and size
    state = (str(tokenizer.chat_template), len(tokenizer))
    known = _END_OF_TURN.get(tokenizer)
    if known is None or known[0] != state:
        found = template_end_of_turn(tokenizer) if tokenizer.chat_template else None
        if found is None and tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer's chat template ends a reply with no special token "
                             "and it has no eos token; set tokenizer.eos_token")
        known = (state, int(found if found is not None else tokenizer.eos_token_id))
        _END_OF_TURN[tokenizer] = known
    return known[1]


_END_OF_TURN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fit_embeddings(model, tokenizer) -> int:
    """Grow ``model``'s token embeddings (and output layer) to ``len(tokenizer)`` after
    :func:`companion.tokenizer.prepare_tokenizer` added tokens; return how many rows were
    added (new rows start at the mean of the old ones, as transformers does)."""
    current = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= current:
        return 0
    model.resize_token_embeddings(len(tokenizer))
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return len(tokenizer) - current


def image_token_id(tokenizer) -> int:
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token; add it with "
                         "tokenizer.add_special_tokens({'additional_special_tokens': "
                         f"['{IMAGE_TOKEN}']}})"
                         " and resize the LM's embeddings")
    return int(token_id)
