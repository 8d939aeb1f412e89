"""The training tricks of section 3.4, as data recipes and measurements.

The seed lists four tricks; each becomes a change to one row of the pipeline's stage table
(:mod:`companion.pipeline`), so an experiment is "the same chain with one setting changed",
and the stages before the change are loaded, not retrained:

1. progressive unfreezing: stage 1 (projector) then stage 2 (projector + LM), against a
   stage 2 that unfreezes both from the start (``stages`` without ``stage1``);
2. the vision encoder's learning rate: frozen, against training it at a small multiple of
   the rest (``lr_scale``) or at the same rate;
3. data mixing: the stage-2 mix with one task type left out (:func:`select_tasks`);
4. quality over quantity: a small clean set (:func:`subsample_scenes`) against a large set
   whose records partly show the wrong image (:func:`mismatch_images`).

This module holds the data recipes and the measurement that the LLaVA metrics do not cover:
how far instruction tuning moved the vision tower away from its CLIP alignment
(:func:`vision_alignment`). The paired comparison of an arm with its control is
:func:`companion.evaluate.paired_difference`; :func:`compare_arm` makes it one row of the
tricks table.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence

import torch

from companion.clip import evaluate_retrieval
from companion.evaluate import paired_difference, verdict


def select_tasks(records: Sequence[dict], tasks: Sequence[str]) -> list[dict]:
    """The records of the given task types, in their order. A requested task type with no
    record is an error (a typo would otherwise silently train on less)."""
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError("select_tasks: no task types given")
    present = {r["task"] for r in records}
    missing = [t for t in tasks if t not in present]
    if missing:
        raise ValueError(f"select_tasks: no records of task type(s) {missing}; the records have "
                         f"{sorted(present)}")
    return [r for r in records if r["task"] in tasks]


def subsample_scenes(records: Sequence[dict], fraction: float, seed: int = 0) -> list[dict]:
    """The records of a random ``fraction`` of the scenes (every record of a kept scene)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"subsample_scenes: fraction={fraction} must be in (0, 1]")
    scene_ids = sorted({r["scene_id"] for r in records})
    if not scene_ids:
        raise ValueError("subsample_scenes: no records")
    keep = set(random.Random(seed).sample(scene_ids, max(1, round(fraction * len(scene_ids)))))
    return [r for r in records if r["scene_id"] in keep]


def mismatch_images(records: Sequence[dict], fraction: float, seed: int = 0) -> list[dict]:
    """A copy of ``records`` in which ``round(fraction * len(records))`` of them, chosen at
    random, show another scene's image: the text stays fluent and right about *its* scene
    but is wrong about the picture, like web alt-text written for a different photo.

    A changed record keeps its text and gets ``scene_id``/``image`` of the other scene, plus
    ``source_scene_id`` (the scene its text is about) and ``noisy=True``.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"mismatch_images: fraction={fraction} must be in [0, 1]")
    out = [copy.deepcopy(dict(r)) for r in records]
    k = round(fraction * len(out))
    if k == 0:
        return out
    images = {}
    for r in out:
        images.setdefault(r["scene_id"], r.get("image"))
    scene_ids = sorted(images)
    if len(scene_ids) < 2:
        raise ValueError("mismatch_images: the records show a single scene; there is no other "
                         "image to swap in")
    rng = random.Random(seed)
    for i in sorted(rng.sample(range(len(out)), k)):
        own = out[i]["scene_id"]
        other = own
        while other == own:
            other = rng.choice(scene_ids)
        out[i]["source_scene_id"] = own
        out[i]["scene_id"] = other
        if images[other] is not None:
            out[i]["image"] = images[other]
        out[i]["noisy"] = True
    return out


def clip_with_vision_tower(clip, vlm):
    """A copy of the CLIPModel ``clip`` whose vision tower is the one inside ``vlm`` (a
    LlavaForConditionalGeneration built from that CLIP), with CLIP's own text tower and
    projections."""
    tuned = copy.deepcopy(clip)
    tuned.vision_model.load_state_dict(vlm.model.vision_tower.state_dict())
    return tuned


def vision_alignment(clip, vlm, data) -> dict[str, float]:
    """Held-out retrieval (R@1, R@5 both ways) of CLIP with ``vlm``'s vision tower put back
    in: how much of the image-text alignment learned in pre-training the VLM's training kept.
    ``data`` is a :class:`companion.clip.CaptionData` of held-out scenes."""
    return evaluate_retrieval(clip_with_vision_tower(clip, vlm), data)


def vision_drift(vlm, clip) -> float:
    """Relative change of the vision tower's weights: ||W_vlm - W_clip|| / ||W_clip||, over
    every vision parameter (0 when it was frozen)."""
    before = clip.vision_model.state_dict()
    after = vlm.model.vision_tower.state_dict()
    num = sum(float((after[k].float() - before[k].float()).pow(2).sum()) for k in before)
    den = sum(float(before[k].float().pow(2).sum()) for k in before)
    return (num / den) ** 0.5 if den else float(torch.nan)


def compare_arm(control, arm, trick: str, name: str, note: str = "") -> tuple[dict, str]:
    """One row of section 3.4's tricks table: ``arm`` against ``control`` (two
    :class:`~companion.answers.TaskScores` of the same held-out records), paired answer by
    answer on "correct" and on "hallucinated" (:func:`companion.evaluate.paired_difference`).

    Returns the row (trick, arm name, note, the arm's mean task accuracy, its accuracy and
    hallucination rate with their paired changes and standard errors, and the
    :func:`~companion.evaluate.verdict` on accuracy) and a line that says the same in words,
    from control to arm.
    """
    acc = paired_difference(control, arm, "correct")
    hal = paired_difference(control, arm, "hallucinated")
    row = {"trick": trick, "arm": name, "note": note,
           "mean_task_accuracy": arm.mean_task_accuracy(),
           "accuracy": acc["arm"], "accuracy_change": acc["difference"], "accuracy_se": acc["se"],
           "hallucination": hal["arm"], "hallucination_change": hal["difference"],
           "hallucination_se": hal["se"],
           "verdict": verdict(acc["difference"], acc["se"])}
    line = (f"{name}: answers correct {acc['control']:.3f} -> {acc['arm']:.3f} "
            f"({acc['difference']:+.3f} ± {acc['se']:.3f}), hallucinating {hal['control']:.3f} -> "
            f"{hal['arm']:.3f} ({hal['difference']:+.3f} ± {hal['se']:.3f}): {row['verdict']}")
    return row, line
