"""Preference data and the reward model (section 3.3, steps 1 and 2 of RLHF).

Step 1 of the seed's RLHF picture: for an image and a question the policy (the
instruction-tuned model of 3.2) samples several answers, and a labeler says which is better.
Here the labeler is the shapes world's judge, which knows the scene: an answer's *utility* is
the judge's score (partial credit in [0, 1]) minus a penalty when it claims something that is
not in the image (a hallucination). A ``noise`` knob flips a share of the labeler's choices,
standing in for humans who disagree.

Records use TRL's field names: ``prompt`` (the human turn, with ``<image>``), ``chosen`` and
``rejected`` (assistant replies), ``images`` (the image's path), plus what the labeler saw.

Step 2: the seed's :class:`RewardModel` (the VLM's backbone with a scalar head on the last
non-padding token) trained with the Bradley-Terry loss ``-log sigma(r_chosen - r_rejected)``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from companion.answers import generate_replies
from companion.batching import IGNORE_INDEX, pad_examples
from companion.clip import pixel_values_for
from companion.data.preference import PREFERENCE_KEYS  # noqa: F401 (re-exported)
from companion.data.preference import read_preferences, validate_preference_records
from companion.instruction import NoTargetError, build_example
from companion.llava import image_seq_length
from companion.losses.preference import bradley_terry_loss, sequence_logprobs
from companion.tokenizer import IMAGE_TOKEN, image_token_id
from companion.world import TASK_TYPES, judge_answer, make_instruction_dataset

# ----------------------------------------------------------------------------- prompts

def preference_prompts(scenes: Sequence, seed: int = 0, tasks: Sequence[str] | None = None
                       ) -> list[dict]:
    """Single-turn prompts about ``scenes``: the first question of one record of each task
    type per scene, with the judge's check for its answer."""
    records = make_instruction_dataset(scenes, tasks=tasks or TASK_TYPES, seed=seed)
    return [{"id": r["id"], "scene_id": r["scene_id"], "task": r["task"], "image": r["image"],
             "prompt": r["conversations"][0]["value"], "check": r["checks"][0],
             "reference": r["conversations"][1]["value"]} for r in records]


def prompt_turns(prompt: str, facts: str | None = None) -> list[dict]:
    """The human turn of a prompt; with ``facts``, the factual reward model's: the image's
    ground truth in words on its own line, between the image and the question."""
    if facts is None:
        return [{"from": "human", "value": prompt}]
    if not isinstance(facts, str) or not facts.strip():
        raise ValueError(f"facts={facts!r}: give the image's ground truth as a non-empty text")
    image, newline, question = prompt.partition("\n")
    if image.strip() != IMAGE_TOKEN or not newline:
        raise ValueError(f"prompt {prompt[:60]!r} does not start with {IMAGE_TOKEN} and a "
                         "new line, so there is no place for the facts after the image")
    return [{"from": "human", "value": f"{IMAGE_TOKEN}\n{facts.strip()}\n{question}"}]


def utility(result, hallucination_penalty: float = 0.5) -> float:
    """What the labeler prefers: the judge's score, minus a penalty for hallucinating."""
    return float(result.score) - hallucination_penalty * bool(result.hallucinations)


def judge_reply(scene, reply: str, check: dict, hallucination_penalty: float = 0.5) -> dict:
    result = judge_answer(scene, reply, check)
    return {"utility": utility(result, hallucination_penalty), "correct": bool(result.passed),
            "hallucinated": bool(result.hallucinations)}


# ----------------------------------------------------------------------------- sampling

def sample_replies(model, tokenizer, prompts: Sequence[dict], pixel_values: torch.Tensor,
                   n_samples: int = 4, temperature: float = 1.0, max_new_tokens: int = 32,
                   seed: int = 0, batch_size: int = 128) -> list[list[str]]:
    """``n_samples`` sampled replies per prompt (``pixel_values`` row i is prompt i's image)."""
    if n_samples < 2:
        raise ValueError(f"n_samples={n_samples}: a preference needs at least two answers")
    rows = [i for i in range(len(prompts)) for _ in range(n_samples)]
    texts: list[str] = []
    for k, start in enumerate(range(0, len(rows), batch_size)):
        chunk = rows[start:start + batch_size]
        texts += generate_replies(model, tokenizer, [prompt_turns(prompts[i]["prompt"])
                                                     for i in chunk],
                                  pixel_values[chunk], max_new_tokens=max_new_tokens,
                                  do_sample=True, temperature=temperature,
                                  generator_seed=seed * 7919 + k)
    return [texts[i * n_samples:(i + 1) * n_samples] for i in range(len(prompts))]


def label_preferences(prompts: Sequence[dict], replies: Sequence[Sequence[str]],
                      scenes_by_id: dict, noise: float = 0.0, seed: int = 0,
                      hallucination_penalty: float = 0.5, pairs: str = "best_worst"
                      ) -> list[dict]:
    """The labeler's pairs. For each prompt the labeler judges its sampled replies and
    compares them: ``pairs="best_worst"`` keeps the best against the worst (one pair per
    prompt), ``pairs="all"`` every two replies of different utility (InstructGPT ranks K
    answers and trains on all K(K-1)/2 comparisons). Replies that tie give no pair. With
    probability ``noise`` a comparison is flipped (``flipped`` records it, for the reader;
    training never looks)."""
    if not 0 <= noise <= 1:
        raise ValueError(f"noise={noise} must be a probability in [0, 1]")
    if pairs not in ("best_worst", "all"):
        raise ValueError(f"pairs={pairs!r}; expected 'best_worst' or 'all'")
    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts but {len(replies)} lists of replies")
    rng = random.Random(seed)
    records = []
    for prompt, answers in zip(prompts, replies):
        scene = scenes_by_id[prompt["scene_id"]]
        judged = [judge_reply(scene, a, prompt["check"], hallucination_penalty) for a in answers]
        order = sorted(range(len(answers)), key=lambda i: -judged[i]["utility"])
        if pairs == "best_worst":
            comparisons = [(order[0], order[-1])]
        else:
            comparisons = [(a, b) for k, a in enumerate(order) for b in order[k + 1:]]
        seen = set()
        for better, worse in comparisons:
            key = (answers[better], answers[worse])
            if judged[better]["utility"] == judged[worse]["utility"] or key in seen:
                continue
            seen.add(key)
            flip = rng.random() < noise
            chosen, rejected = (worse, better) if flip else (better, worse)
            records.append({
                "id": f"{prompt['id']}-{len(seen)}", "scene_id": prompt["scene_id"],
                "task": prompt["task"], "images": [prompt["image"]], "prompt": prompt["prompt"],
                "chosen": answers[chosen], "rejected": answers[rejected],
                "chosen_utility": judged[chosen]["utility"],
                "rejected_utility": judged[rejected]["utility"],
                "chosen_hallucinated": judged[chosen]["hallucinated"],
                "rejected_hallucinated": judged[rejected]["hallucinated"], "flipped": flip})
    return records


def flip_preferences(records: Sequence[dict], noise: float, seed: int = 0) -> list[dict]:
    """Copies of ``records`` with each choice flipped with probability ``noise`` (a noisier
    labeler on the same comparisons); ``flipped`` says which ones were."""
    if not 0 <= noise <= 1:
        raise ValueError(f"noise={noise} must be a probability in [0, 1]")
    rng = random.Random(seed)
    out = []
    for record in records:
        record = dict(record)
        if rng.random() < noise:
            for a, b in (("chosen", "rejected"), ("chosen_utility", "rejected_utility"),
                         ("chosen_hallucinated", "rejected_hallucinated")):
                if a in record and b in record:
                    record[a], record[b] = record[b], record[a]
            record["flipped"] = not record.get("flipped", False)
        out.append(record)
    return out


# ----------------------------------------------------------------------------- files

def save_preferences(path, records: Sequence[dict]) -> None:
    """Write records as JSON (to a temporary file first, so a crash never leaves half a file)."""
    path = Path(path)
    validate_preference_records(list(records), str(path))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(list(records), ensure_ascii=False, indent=1))
    os.replace(tmp, path)


def load_preferences(source, image_cache=None) -> list[dict]:
    """Validated preference records from a ``.json`` / ``.jsonl`` / ``.parquet`` file, a
    ``Dataset.save_to_disk`` folder, a ``datasets.Dataset`` or a list, in TRL's standard or
    conversational form (:func:`companion.data.preference.read_preferences`); PIL images
    are written to ``image_cache`` and read from there."""
    return read_preferences(source, image_cache)


# ----------------------------------------------------------------------------- encoding

@dataclass
class PreferenceData:
    """Preference pairs encoded once: chosen and rejected sequences, one image per pair."""

    chosen: list[dict]
    rejected: list[dict]
    pixel_values: torch.Tensor   # (N, 3, H, W)
    skipped: list[tuple[str, str]]
    factual: bool = False        # each prompt carries the scene's facts (a factual RM's data)

    def __len__(self) -> int:
        return len(self.chosen)

    def batch(self, rows: Sequence[int], pad_id: int) -> dict:
        """Rows ``rows`` as one concatenated batch: the chosen sequences, then the rejected
        ones (so one forward pass scores both); ``n_pairs`` says where the halves meet."""
        rows = list(rows)
        out = pad_examples([self.chosen[r] for r in rows] + [self.rejected[r] for r in rows],
                           pad_id)
        out["pixel_values"] = torch.cat([self.pixel_values[rows]] * 2)
        out["n_pairs"] = len(rows)
        out["rows"] = torch.tensor(rows, dtype=torch.long)
        return out

    def draw(self, batch_size: int, step: int, seed: int, pad_id: int) -> dict:
        """The training batch of ``step``: random rows, deterministic in ``(seed, step)``."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        rows = torch.randint(len(self), (batch_size,), generator=generator).tolist()
        return self.batch(rows, pad_id)


def encode_preferences(records: Sequence[dict], tokenizer, image_processor, n_image_tokens: int,
                       load_image, max_length: int = 512, facts=None) -> PreferenceData:
    """Encode each pair as two chat sequences (prompt + reply) with labels on the reply only.

    ``facts(record) -> str``: the factual reward model's data (LLaVA-RLHF's Factually
    Augmented RLHF): each prompt also carries the image's ground truth in words
    (:func:`prompt_turns`), so the reward model can check a claim against it instead of
    having to see it."""
    image_id = image_token_id(tokenizer)
    chosen, rejected, images, skipped = [], [], [], []
    for index, record in enumerate(records):
        where = f"preference record {record.get('id', index)!r}"
        try:
            turns = prompt_turns(record["prompt"], None if facts is None else facts(record))
            pair = [build_example(tokenizer, turns + [{"from": "gpt", "value": record[key]}],
                                  n_image_tokens, image_id, max_length, f"{where} ({key})")
                    for key in ("chosen", "rejected")]
        except NoTargetError as error:
            skipped.append((str(record.get("id", index)), str(error)))
            continue
        chosen.append(pair[0])
        rejected.append(pair[1])
        images.append(load_image(record))
    if not chosen:
        raise NoTargetError("no preference pair has a reply to score")
    return PreferenceData(chosen, rejected, pixel_values_for(image_processor, images), skipped,
                          factual=facts is not None)


# ----------------------------------------------------------------------------- reward model

def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token of each row (works for left or right padding)."""
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be (B, T), got {tuple(attention_mask.shape)}")
    if not bool(attention_mask.any(1).all()):
        bad = (~attention_mask.bool().any(1)).nonzero().flatten().tolist()
        raise ValueError(f"rows {bad} are all padding: nothing to score")
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * (positions + 1)).argmax(1)


class RewardModel(nn.Module):
    """The seed's reward model: a VLM backbone and a scalar head.

    ``base_model`` is a ``LlavaForConditionalGeneration``. With ``pooling="last"`` (the
    seed's choice, and InstructGPT's) the head reads the backbone's last hidden state at the
    last non-padding token. With ``pooling="mean"`` it reads every reply token and averages:
    each reply token's state has seen that token and the image, so a claim that contradicts
    the image can be scored where it is made, instead of having to be carried to the end of
    the sequence by attention (hard for a two-layer LM).

    With ``pooling="likelihood"`` there is no new head: the reward is the model's own
    log-probability of the reply, ``sum_t log p(y_t | y_<t, prompt)``, read through its LM
    head, and Bradley-Terry training moves that likelihood (a *generative* reward model; it
    is DPO's implicit reward without the reference term). Before any training it ranks
    pairs as the SFT model's likelihood does, instead of at chance as a new head does; with
    the scene's facts in the prompt, that likelihood already checks a reply against them.
    """

    POOLINGS = ("last", "mean", "likelihood")

    def __init__(self, base_model, pooling: str = "last", reads_facts: bool = False):
        super().__init__()
        if pooling not in self.POOLINGS:
            raise ValueError(f"pooling={pooling!r}; expected one of {', '.join(self.POOLINGS)}")
        self.pooling = pooling
        # a factual reward model (trained with the scene's facts in each prompt) must be
        # scored the same way: score_pairs and score_replies refuse the other layout
        self.reads_facts = reads_facts
        self.base_model = base_model.model
        self.config = base_model.config
        if pooling == "likelihood":
            self.lm_head = base_model.lm_head
            return
        hidden = base_model.config.text_config.hidden_size
        self.reward_head = nn.Linear(hidden, 1)
        nn.init.normal_(self.reward_head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.reward_head.bias)

    def forward(self, input_ids, attention_mask, pixel_values,
                reply_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (B,); ``reply_mask`` (B, T) marks the reply tokens (for mean pooling and
        likelihood)."""
        if self.pooling == "likelihood":
            if reply_mask is None:
                raise ValueError("pooling='likelihood' needs reply_mask (labels != -100)")
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # as reply_logps
            hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=positions,
                                     pixel_values=pixel_values).last_hidden_state
            labels = input_ids.masked_fill(~reply_mask.bool(), IGNORE_INDEX)
            return sequence_logprobs(self.lm_head(hidden).float(), labels)
        hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                 pixel_values=pixel_values).last_hidden_state
        if self.pooling == "last":
            last = last_token_index(attention_mask)
            features = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
            return self.reward_head(features).squeeze(-1).float()
        if reply_mask is None:
            raise ValueError("pooling='mean' needs reply_mask (labels != -100)")
        weights = reply_mask.to(hidden.dtype)
        if not bool((weights.sum(1) > 0).all()):
            raise ValueError("a row has no reply token to pool over")
        per_token = self.reward_head(hidden).squeeze(-1).float()
        return (per_token * weights).sum(1) / weights.sum(1)


def reward_model_loss(model, batch: dict, margin: float = 0.0,
                      offsets: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, dict]:
    """The seed's loss on a :meth:`PreferenceData.batch`: one forward pass over chosen and
    rejected sequences, then Bradley-Terry. Returns ``(loss, {"accuracy", "margin"})``.

    ``offsets``: a fixed score per pair of the whole data set, ``(chosen (N,), rejected
    (N,))``, subtracted from the model's rewards of the batch's rows (``batch["rows"]``), so
    that the reward is the model's score *relative to* a fixed baseline (as DPO's implicit
    reward is relative to the reference model's log-probs)."""
    rewards = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                    batch["labels"] != IGNORE_INDEX)
    n = batch["n_pairs"]
    chosen, rejected = rewards[:n], rewards[n:]
    if offsets is not None:
        rows = batch["rows"]
        chosen = chosen - offsets[0][rows].to(chosen)
        rejected = rejected - offsets[1][rows].to(rejected)
    loss = bradley_terry_loss(chosen, rejected, margin=margin)
    chosen, rejected = chosen.detach(), rejected.detach()
    return loss, {"accuracy": float((chosen > rejected).float().mean()),
                  "reward_margin": float((chosen - rejected).mean())}


def reward_trainable(model: RewardModel) -> dict[str, int]:
    """Freeze the vision tower; train projector, LM and head (as the policy is trained)."""
    counts = {"vision": 0, "projector+lm+head": 0}
    for name, p in model.named_parameters():
        frozen = name.startswith("base_model.vision_tower.")
        p.requires_grad_(not frozen)
        counts["vision" if frozen else "projector+lm+head"] += 0 if frozen else p.numel()
    return counts


def _check_layout(model: RewardModel, factual: bool, what: str) -> None:
    """A reward model scores only the prompt layout it was trained on: with the scene's facts
    (a factual reward model) or without them. The other layout gives numbers, but wrong ones."""
    reads = getattr(model, "reads_facts", False)
    if reads and not factual:
        raise ValueError(f"this reward model reads the scene's facts, and {what} carry none: "
                         "encode them with factual=True (preference_data) or pass facts= "
                         "(score_replies)")
    if factual and not reads:
        raise ValueError(f"{what} carry the scene's facts, and this reward model was not "
                         "trained with them (reads_facts=False): encode without the facts, or "
                         "use a factual reward model")


@torch.no_grad()
def score_pairs(model: RewardModel, data: PreferenceData, pad_id: int,
                batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of every chosen and rejected reply in ``data`` ((N,), (N,))."""
    _check_layout(model, data.factual, "the pairs")
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for start in range(0, len(data), batch_size):
        rows = range(start, min(start + batch_size, len(data)))
        batch = data.batch(rows, pad_id)
        rewards = model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                        batch["pixel_values"].to(device),
                        (batch["labels"] != IGNORE_INDEX).to(device)).cpu()
        chosen.append(rewards[:len(rows)])
        rejected.append(rewards[len(rows):])
    return torch.cat(chosen), torch.cat(rejected)


def pair_accuracy(model: RewardModel, data: PreferenceData, pad_id: int) -> float:
    """Share of pairs where the reward model ranks the chosen reply above the rejected one."""
    chosen, rejected = score_pairs(model, data, pad_id)
    return float((chosen > rejected).float().mean())


@torch.no_grad()
def score_replies(model: RewardModel, tokenizer, prompts: Sequence[str], replies: Sequence[str],
                  pixel_values: torch.Tensor, batch_size: int = 64,
                  facts: Sequence[str] | None = None) -> torch.Tensor:
    """Reward of each (prompt, reply) pair; ``pixel_values`` row i belongs to pair i;
    ``facts`` (one text per pair) for a factual reward model (:func:`encode_preferences`)."""
    if facts is not None and len(facts) != len(prompts):
        raise ValueError(f"{len(facts)} facts for {len(prompts)} prompts: give one per prompt")
    _check_layout(model, facts is not None, "the prompts")

    model.eval()
    device = next(model.parameters()).device
    n_image, image_id = image_seq_length(model), image_token_id(tokenizer)
    scores = []
    for start in range(0, len(prompts), batch_size):
        rows = range(start, min(start + batch_size, len(prompts)))
        examples = []
        for i in rows:
            turns = prompt_turns(prompts[i], None if facts is None else facts[i]) + [
                {"from": "gpt", "value": replies[i]}]
            examples.append(build_example(tokenizer, turns, n_image, image_id,
                                          where=f"reply {i}"))
        batch = pad_examples(examples, tokenizer.pad_token_id)
        scores.append(model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                            pixel_values[list(rows)].to(device),
                            (batch["labels"] != IGNORE_INDEX).to(device)).cpu())
    return torch.cat(scores)
