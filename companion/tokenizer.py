"""A small BPE tokenizer trained on the shapes world's text, wrapped as a transformers tokenizer.

The chat template marks assistant replies with ``{% generation %}`` blocks, so
``apply_chat_template(..., return_assistant_tokens_mask=True)`` tells which tokens are the
assistant's: exactly the tokens that carry loss in instruction tuning (3.2). The end-of-turn
token of an assistant reply is inside the block, so the model learns to stop.

Conversation layout (one line per turn)::

    <|user|>\\n<image>\\nHow many circles are there?<|end|>\\n
    <|assistant|>\\n[There is one circle.<|end|>]\\n      <- [...] is the assistant mask
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
IMAGE_TOKEN = "<image>"
USER, ASSISTANT, SYSTEM, END_OF_TURN = "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"
# Order fixes the ids: pad 0, unk 1, bos 2, eos 3. (Hugging Face's CLIP text model treats
# eos_token_id == 2 as a legacy config and pools at argmax(input_ids) instead of at the eos.)
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, IMAGE_TOKEN, USER, ASSISTANT, SYSTEM, END_OF_TURN]

# Message content may be a string (LLaVA JSON: "<image>\n..." inline) or a list of
# {"type": "image"} / {"type": "text", "text": ...} parts (the transformers processor style).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set content = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set content.text = content.text + '<image>\n' -%}"
    "{%- else -%}{%- set content.text = content.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set content = content.text -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '<|user|>\n' + content + '<|end|>\n' }}"
    "{%- elif message['role'] == 'system' -%}"
    "{{ '<|system|>\n' + content + '<|end|>\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ content + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ raise_exception('unknown role ' + message['role'] + '; expected user, assistant or system') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 600, min_frequency: int = 2):
    """Train a byte-level BPE on ``texts`` and return a ``PreTrainedTokenizerFast``.

    Byte-level pre-tokenisation means any string can be encoded (no unknown characters),
    as in GPT-2; the world's small closed vocabulary makes most words single tokens.
    Training is deterministic for the same texts in the same order.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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
    from transformers import PreTrainedTokenizerFast

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
    from transformers import AutoTokenizer

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


def encode_chat(tokenizer, conversations: list[dict]) -> dict:
    """Token ids and assistant mask of a LLaVA conversation through the chat template.

    Returns ``{"input_ids": list[int], "assistant_mask": list[int]}`` where the mask is 1
    exactly on assistant reply tokens and their end-of-turn token.
    """
    encoded = tokenizer.apply_chat_template(
        to_chat_messages(conversations),
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    return {"input_ids": list(encoded["input_ids"]),
            "assistant_mask": list(encoded["assistant_masks"])}


def world_corpus(n_scenes: int = 2000, seed: int = 12345) -> list[str]:
    """Text of the shapes world the tokenizer is trained on: every caption phrasing and
    every turn of instruction samples of all six task types."""
    from companion.world import TASK_TYPES, make_instruction_dataset, make_scenes, scene_captions

    scenes = make_scenes(n_scenes, seed=seed)
    texts = [caption for scene in scenes for caption in scene_captions(scene)]
    records = make_instruction_dataset(scenes, tasks=TASK_TYPES, samples_per_scene=1, seed=seed)
    texts += [turn["value"] for record in records for turn in record["conversations"]]
    return texts


def world_tokenizer(cache_dir: str | os.PathLike, vocab_size: int = 600,
                    n_scenes: int = 2000, seed: int = 12345, log=print):
    """The world's tokenizer, trained once and cached (keyed by its config)."""
    from companion.artifacts import cached_artifact

    config = {"kind": "world-bpe", "vocab_size": vocab_size, "n_scenes": n_scenes,
              "seed": seed, "template": CHAT_TEMPLATE, "specials": SPECIAL_TOKENS}

    def build(folder):
        train_tokenizer(world_corpus(n_scenes, seed), vocab_size=vocab_size).save_pretrained(folder)

    return load_tokenizer(cached_artifact(cache_dir, "tokenizer", config, build, log=log))


def assistant_mask_html(tokenizer, encoded: dict) -> str:
    """HTML of a tokenised conversation: tokens that carry loss green, the rest grey."""
    from html import escape

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
