"""Evaluation shared by the chapters: retrieval recall@k, zero-shot classification, caption
quality, and the paired comparison of two judged runs on the same held-out questions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from companion.world import TASK_TYPES, judge_answer, judge_description


def recall_at_k(
    similarity: torch.Tensor,
    query_groups: Sequence[int] | torch.Tensor | None = None,
    candidate_groups: Sequence[int] | torch.Tensor | None = None,
    ks: Sequence[int] = (1, 5),
    *,
    relevance: torch.Tensor | None = None,
) -> dict[int, float]:
    """Share of queries whose top-k candidates contain a correct one.

    similarity: (Q, C) scores, higher is better. Correctness is given either by groups,
    (Q,) and (C,) integer ids (a candidate is correct when its group equals the query's),
    or by ``relevance``, a (Q, C) bool matrix (candidate c is correct for query q).
    """
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be (Q, C), got shape {tuple(similarity.shape)}")
    if relevance is not None:
        if query_groups is not None or candidate_groups is not None:
            raise ValueError("give either groups or relevance, not both")
        relevance = torch.as_tensor(relevance, device=similarity.device)
        if relevance.shape != similarity.shape or relevance.dtype != torch.bool:
            raise ValueError(f"relevance must be a bool tensor of shape {tuple(similarity.shape)}, "
                             f"got {relevance.dtype} {tuple(relevance.shape)}")
        unanswerable = (~relevance.any(dim=1)).nonzero().flatten()
        if len(unanswerable):
            raise ValueError(f"query {int(unanswerable[0])} has no correct candidate "
                             f"({len(unanswerable)} such queries): recall is undefined")
    else:
        if query_groups is None or candidate_groups is None:
            raise ValueError("recall_at_k needs query_groups and candidate_groups, or relevance")
        query_groups = torch.as_tensor(query_groups, device=similarity.device)
        candidate_groups = torch.as_tensor(candidate_groups, device=similarity.device)
        if (query_groups.shape != (similarity.shape[0],)
                or candidate_groups.shape != (similarity.shape[1],)):
            raise ValueError(
                f"groups must have shapes ({similarity.shape[0]},) and ({similarity.shape[1]},), "
                f"got {tuple(query_groups.shape)} and {tuple(candidate_groups.shape)}")
        relevance = candidate_groups[None, :] == query_groups[:, None]   # [Q, C]
    results = {}
    for k in ks:
        k_eff = min(k, similarity.shape[1])
        top = similarity.topk(k_eff, dim=1).indices                     # [Q, k]
        hit = relevance.gather(1, top).any(dim=1)                       # [Q]
        results[k] = hit.float().mean().item()
    return results


def retrieval_metrics(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    image_groups: Sequence[int] | torch.Tensor | None = None,
    text_groups: Sequence[int] | torch.Tensor | None = None,
    ks: Sequence[int] = (1, 5),
    *,
    relevance: torch.Tensor | None = None,
) -> dict[str, float]:
    """Image→text and text→image recall@k on cosine similarity.

    Correct pairs are given by groups or by an (I, T) bool ``relevance`` matrix (see
    :func:`recall_at_k`). Returns
    ``{"i2t_R@1": ..., "i2t_R@5": ..., "t2i_R@1": ..., "t2i_R@5": ...}``.
    """
    image_embeddings = F.normalize(image_embeddings.float(), dim=-1)  # [I, D]
    text_embeddings = F.normalize(text_embeddings.float(), dim=-1)    # [T, D]
    similarity = image_embeddings @ text_embeddings.T                 # [I, T]
    out = {}
    if relevance is not None:
        relevance = torch.as_tensor(relevance)
        forward = dict(relevance=relevance)
        backward = dict(relevance=relevance.T)
    else:
        forward = dict(query_groups=image_groups, candidate_groups=text_groups)
        backward = dict(query_groups=text_groups, candidate_groups=image_groups)
    for k, value in recall_at_k(similarity, ks=ks, **forward).items():
        out[f"i2t_R@{k}"] = value
    for k, value in recall_at_k(similarity.T, ks=ks, **backward).items():
        out[f"t2i_R@{k}"] = value
    return out


def zero_shot_classify(
    image_embeddings: torch.Tensor, class_text_embeddings: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """Predicted class per image from text prompts.

    image_embeddings: (N, D); class_text_embeddings: (C, P, D) with P prompts per class, or
    (C, D). ``reduction="mean"`` averages each class's normalised prompt embeddings (CLIP's
    prompt ensembling over its 80 templates); ``"max"`` scores a class by its best prompt.
    """
    images = F.normalize(image_embeddings.float(), dim=-1)            # [N, D]
    if class_text_embeddings.ndim == 2:
        class_text_embeddings = class_text_embeddings[:, None]        # [C, 1, D]
    prompts = F.normalize(class_text_embeddings.float(), dim=-1)      # [C, P, D]
    if reduction == "mean":
        classes = F.normalize(prompts.mean(dim=1), dim=-1)            # [C, D]
        return (images @ classes.T).argmax(dim=1)                      # [N]
    if reduction == "max":
        scores = torch.einsum("nd,cpd->ncp", images, prompts)          # [N, C, P]
        return scores.amax(dim=2).argmax(dim=1)                        # [N]
    raise ValueError(f"reduction={reduction!r}: use 'mean' or 'max'")


def caption_quality(scenes, captions) -> dict[str, float]:
    """Judge generated captions against their scenes (the world's ground truth).

    Returns the mean attribute-level precision, recall and F1 of the facts the captions
    state (size, colour, shape and region of each object; the word and its region), the
    share of captions that describe their scene exactly (every object right, nothing
    extra), and the hallucination rate: the share of captions that mention an object,
    colour, count or word that is not in the scene.
    """
    scenes, captions = list(scenes), list(captions)
    if len(scenes) != len(captions):
        raise ValueError(f"caption_quality: {len(scenes)} scenes but {len(captions)} captions")
    if not scenes:
        raise ValueError("caption_quality got no captions to judge")
    totals = {"precision": 0.0, "recall": 0.0, "f1": 0.0, "exact": 0.0, "hallucination_rate": 0.0}
    for scene, caption in zip(scenes, captions):
        facts = judge_description(scene, caption)
        verdict = judge_answer(scene, caption, {"kind": "describe"})
        totals["precision"] += facts.precision
        totals["recall"] += facts.recall
        totals["f1"] += facts.f1
        totals["exact"] += float(verdict.passed)
        totals["hallucination_rate"] += float(bool(verdict.hallucinations))
    return {key: value / len(scenes) for key, value in totals.items()}


# ----------------------------------------------------------------------------- paired comparisons

def _answer_values(scores, key: str, task: str | None) -> dict[tuple, float]:
    out = {}
    for a in scores.answers:
        if task is not None and a["task"] != task:
            continue
        value = bool(a["hallucinations"]) if key == "hallucinated" else bool(a[key])
        out[(a["id"], a["turn"])] = float(value)
    return out


def paired_difference(control, arm, key: str = "correct", task: str | None = None
                      ) -> dict[str, float]:
    """``arm - control`` on the same judged answers (two :class:`~companion.instruction.TaskScores`
    of the same held-out records), with the standard error of the paired difference.

    ``key`` is ``"correct"`` (accuracy) or ``"hallucinated"`` (hallucination rate); ``task``
    keeps one task type's answers. Answers are matched by (record id, turn); both runs must
    have answered the same questions. Returns ``{"control", "arm", "difference", "se", "n"}``;
    |difference| > 2 se is the chapter's bar for "an effect, not noise" (:func:`verdict`).

    Pairing is what makes the bar reachable: both runs answer the same questions, so the
    questions' own difficulty cancels and only the answers that changed carry variance. The
    two turns of a multi-turn record count as two answers.
    """
    if key not in ("correct", "hallucinated"):
        raise ValueError(f"paired_difference: key={key!r}; choose 'correct' or 'hallucinated'")
    a, b = _answer_values(control, key, task), _answer_values(arm, key, task)
    common = sorted(set(a) & set(b))
    if not common:
        where = f" of task {task!r}" if task is not None else ""
        raise ValueError(f"paired_difference: the two runs share no answers{where}; score them "
                         "on the same held-out records")
    diffs = [b[k] - a[k] for k in common]
    n = len(diffs)
    mean = sum(diffs) / n
    # one answer says nothing about the noise: its se is NaN, which verdict() reads as "no
    # clear effect" (a smoke-sized test set can hold a single answer of some task type)
    se = (sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) ** 0.5 if n > 1 else float("nan")
    return {"control": sum(a[k] for k in common) / n, "arm": sum(b[k] for k in common) / n,
            "difference": mean, "se": se, "n": n}


def task_mean_difference(control, arm) -> dict:
    """The change of *mean task accuracy* (the average over task types of each type's
    accuracy, as :meth:`~companion.instruction.TaskScores.mean_task_accuracy`) from
    ``control`` to ``arm``, with its standard error, and each task type's own paired change.

    The task types' answers are disjoint, so their paired differences are independent and
    the mean's standard error is sqrt(sum of se_t^2) / T. Both runs must cover the same task
    types. Returns ``{"control", "arm", "difference", "se", "by_task": {task: paired}}``, the
    task types in the world's order (others after them, as they first appear).
    """
    tasks_c = {a["task"] for a in control.answers}
    tasks_a = {a["task"] for a in arm.answers}
    if tasks_c != tasks_a:
        raise ValueError(f"task_mean_difference: the runs answered different task types "
                         f"({sorted(tasks_c)} against {sorted(tasks_a)}); score them on the same "
                         "held-out records")
    if not tasks_c:
        raise ValueError("task_mean_difference: no judged answers to compare")

    seen = [a["task"] for a in control.answers]
    tasks = sorted(tasks_c, key=lambda t: (TASK_TYPES.index(t) if t in TASK_TYPES
                                           else len(TASK_TYPES), seen.index(t)))
    by_task = {t: paired_difference(control, arm, "correct", task=t) for t in tasks}
    n = len(tasks)
    return {"control": sum(r["control"] for r in by_task.values()) / n,
            "arm": sum(r["arm"] for r in by_task.values()) / n,
            "difference": sum(r["difference"] for r in by_task.values()) / n,
            "se": sum(r["se"] ** 2 for r in by_task.values()) ** 0.5 / n,
            "by_task": by_task}


# every word :func:`verdict` can return (the notebooks' nbval masking reads them as trained)
VERDICTS = ("helped", "hurt", "no clear effect")


def verdict(difference: float, se: float, higher_is_better: bool = True) -> str:
    """Words for a measured difference: 'helped' / 'hurt' beyond 2 standard errors, else
    'no clear effect' (also when the standard error is unknown: NaN)."""
    if not abs(difference) > 2 * se:  # False for a NaN se
        return "no clear effect"
    return "helped" if (difference > 0) == higher_is_better else "hurt"
