"""Batches of token sequences: padding, the labels' ignore index, length-grouped rows.

Every training loop of the chapter (the LM's pretraining, both LLaVA stages, the reward
model, DPO) draws its batches with these, so they sit below every other module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100  # a label the loss skips (cross-entropy's ignore_index)


def pad_examples(examples: Sequence[dict], pad_id: int, side: str = "right") -> dict:
    """Pad ``input_ids`` (with ``pad_id``) and ``labels`` (with -100); attention mask 0 on pads."""
    if not examples:
        raise ValueError("pad_examples got no examples")
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        span = slice(0, n) if side == "right" else slice(length - n, length)
        input_ids[row, span] = torch.tensor(example["input_ids"])
        attention[row, span] = 1
        if "labels" in example:
            labels[row, span] = torch.tensor(example["labels"])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def label_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The number of tokens a causal-LM loss averages over: labels not -100 after the shift
    by one (Hugging Face's ``ForCausalLMLoss``). Under ``torchrun`` it weights each rank's
    token-mean loss so that their combination is the token mean of the whole batch."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def grouped_rows(lengths: Sequence[int], batch_size: int, step: int, seed: int = 0,
                 group: int = 8) -> list[int]:
    """Row indices of the batch of ``step`` (random, with replacement, deterministic in
    ``(seed, step)``), drawn ``group`` batches at a time and sorted by length so that each
    batch holds sequences of similar length (see :meth:`InstructionData.batch`)."""
    if batch_size < 1 or group < 1:
        raise ValueError(f"batch_size={batch_size} and group={group} must be positive")
    if not lengths:
        raise ValueError("no rows to draw a batch from")
    block, slot = divmod(step, group)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
    rows = torch.randint(len(lengths), (batch_size * group,), generator=generator).tolist()
    if group > 1:
        rows.sort(key=lambda r: lengths[r])
        order = torch.randperm(group, generator=generator).tolist()
        rows = rows[order[slot] * batch_size:(order[slot] + 1) * batch_size]
    return rows
