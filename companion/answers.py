"""Answering and judging: the model writes its replies, the world's judge scores them.

:func:`generate_tokens` and :func:`generate_replies` let a VLM (or a text-only LM, told the
scene in words) answer a conversation; :func:`evaluate_tasks` plays every human turn of
held-out records (multi-turn records as a real chat, each question after the model's own
earlier answers) and judges each answer, and :class:`TaskScores` summarises them per task
type. Sections 3.1.3 to 3.5 measure every model this way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from companion.batching import pad_examples
from companion.llava import expand_image_placeholder, image_seq_length
from companion.tokenizer import IMAGE_TOKEN, end_of_turn_id, image_token_id, to_chat_messages
from companion.world import TASK_TYPES, judge_answer


def prompt_ids(tokenizer, conversations: list[dict], n_image_tokens: int) -> list[int]:
    """Token ids of a conversation that ends with a human turn, plus the assistant header."""
    ids = tokenizer.apply_chat_template(to_chat_messages(conversations), tokenize=True,
                                        add_generation_prompt=True, return_dict=True)["input_ids"]
    ids, _ = expand_image_placeholder(list(ids), [0] * len(ids), image_token_id(tokenizer),
                                      n_image_tokens, "prompt")
    return ids


@torch.no_grad()
def generate_tokens(model, tokenizer, conversations: Sequence[list[dict]],
                    pixel_values: torch.Tensor, max_new_tokens: int = 48,
                    do_sample: bool = False, temperature: float = 1.0,
                    generator_seed: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """``(prompts, replies)``: each conversation's prompt ids (ending with the assistant
    header) and the token ids the model wrote after it, cut after its first end-of-turn token
    (kept, since it is part of the reply the model is trained to write). Greedy unless
    ``do_sample``; prompts are left-padded so that every reply starts at the same column.
    The ``<image>`` placeholder is never generated (a reply containing it could not be fed
    back to the model: every placeholder must match an image feature).

    ``pixel_values=None`` runs a text-only causal LM on conversations without ``<image>``
    (e.g. :func:`companion.vlm.text_only_conversations`)."""
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature={temperature} must be positive when sampling")
    model.eval()
    device = next(model.parameters()).device
    if pixel_values is None and any(IMAGE_TOKEN in str(turn.get("value", ""))
                                    for c in conversations for turn in c):
        raise ValueError("a conversation has <image> but no pixel_values were given; replace "
                         "the image by text (text_only_conversations) or pass the images")
    n_image = image_seq_length(model) if pixel_values is not None else 0
    prompts = [prompt_ids(tokenizer, c, n_image) for c in conversations]
    batch = pad_examples([{"input_ids": p} for p in prompts], tokenizer.pad_token_id, side="left")
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    end = end_of_turn_id(tokenizer)
    output = model.generate(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
        **({} if pixel_values is None else {"pixel_values": pixel_values.to(device)}),
        max_new_tokens=max_new_tokens,
        do_sample=do_sample, temperature=temperature if do_sample else None, top_p=None,
        top_k=None, eos_token_id=end, pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=[image_token_id(tokenizer)])
    replies = []
    for row in output[:, batch["input_ids"].shape[1]:].tolist():
        replies.append(row[:row.index(end) + 1] if end in row else row)
    return prompts, replies


def decode_reply(tokenizer, reply: Sequence[int]) -> str:
    """The text of a generated reply (without its end-of-turn token)."""
    reply = list(reply)
    end = end_of_turn_id(tokenizer)
    if end in reply:
        reply = reply[:reply.index(end)]
    return tokenizer.decode(reply, skip_special_tokens=True).strip()


def generate_replies(model, tokenizer, conversations: Sequence[list[dict]],
                     pixel_values: torch.Tensor, max_new_tokens: int = 48,
                     do_sample: bool = False, temperature: float = 1.0,
                     generator_seed: int | None = None) -> list[str]:
    """The model's next assistant reply to each conversation (greedy unless ``do_sample``)."""
    _, replies = generate_tokens(model, tokenizer, conversations, pixel_values, max_new_tokens,
                                 do_sample, temperature, generator_seed)
    return [decode_reply(tokenizer, reply) for reply in replies]


@dataclass
class TaskScores:
    """Judged answers of held-out records, and their summary per task type."""

    answers: list[dict]   # one per assistant turn: record id, task, turn, question, answer, ...

    def accuracy(self, task: str | None = None) -> float:
        rows = [a for a in self.answers if task is None or a["task"] == task]
        return sum(a["correct"] for a in rows) / max(1, len(rows))

    def hallucination_rate(self, task: str | None = None) -> float:
        rows = [a for a in self.answers if task is None or a["task"] == task]
        return sum(bool(a["hallucinations"]) for a in rows) / max(1, len(rows))

    def by_task(self) -> dict[str, dict[str, float]]:
        tasks = sorted({a["task"] for a in self.answers}, key=_task_order)
        return {t: {"accuracy": self.accuracy(t), "hallucination_rate": self.hallucination_rate(t),
                    "answers": sum(a["task"] == t for a in self.answers)} for t in tasks}

    def mean_task_accuracy(self) -> float:
        table = self.by_task()
        return sum(v["accuracy"] for v in table.values()) / max(1, len(table))


def _task_order(task: str) -> int:
    return TASK_TYPES.index(task) if task in TASK_TYPES else len(TASK_TYPES)


def evaluate_tasks(model, tokenizer, records: Sequence[dict], scenes_by_id: dict,
                   pixel_values: torch.Tensor, batch_size: int = 64,
                   max_new_tokens: int = 48) -> TaskScores:
    """Let the model answer every human turn of ``records`` and judge each answer.

    Multi-turn records are played as a real chat: each later question follows the model's
    *own* earlier answers. ``pixel_values`` (R, 3, H, W) holds each record's image; ``None``
    scores a text-only LM on records whose conversations carry no image.
    """
    answers = []
    history = [[] for _ in records]
    max_turns = max(len(r["checks"]) for r in records)
    for turn in range(max_turns):
        active = [i for i, r in enumerate(records) if len(r["checks"]) > turn]
        for start in range(0, len(active), batch_size):
            rows = active[start:start + batch_size]
            convs = [history[i] + [records[i]["conversations"][2 * turn]] for i in rows]
            pixels = None if pixel_values is None else pixel_values[rows]
            replies = generate_replies(model, tokenizer, convs, pixels,
                                       max_new_tokens=max_new_tokens)
            for i, conv, reply in zip(rows, convs, replies):
                record = records[i]
                check = record["checks"][turn]
                result = judge_answer(scenes_by_id[record["scene_id"]], reply, check)
                answers.append({
                    "id": record["id"], "task": record["task"], "turn": turn,
                    "question": conv[-1]["value"].replace("<image>\n", ""), "answer": reply,
                    "reference": record["conversations"][2 * turn + 1]["value"],
                    "correct": bool(result.passed), "score": result.score,
                    "hallucinations": list(result.hallucinations)})
                history[i] = conv + [{"from": "gpt", "value": reply}]
    return TaskScores(answers)
