"""A careless annotator: the long-form answers a writer who saw only captions would
write, with one object, colour or count that is not in the scene (issue 20; LLaVA-
Instruct was written that way by a text-only GPT-4)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from companion.world.phrases import capitalised, count_objects, join_phrases, there_is
from companion.world.scenes import COLORS, REGIONS, SHAPES, SIZES, Scene
from companion.world.tasks import check_tasks


LONG_FORM_TASKS = ("description", "multi_turn")  # what LLaVA's GPT-4 wrote from captions


def _invented_object(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A plausible object that is not in the scene, at a free cell: a colour or a shape the
    scene has, paired with another (a writer who knows "a red circle" guesses "a red
    square"). Returns (phrase, region)."""
    anchor = rng.choice(scene.objects)
    while True:
        if rng.random() < 0.5:
            color, shape = anchor.color, rng.choice([s for s in SHAPES if s != anchor.shape])
        else:
            color, shape = rng.choice([c for c in COLORS if c != anchor.color]), anchor.shape
        if count_objects(scene, {"color": color, "shape": shape}) == 0:
            break
    used = {o.region for o in scene.objects} | {scene.word_region}
    free = [r for r in REGIONS if r not in used] or [anchor.region]
    return f"a {rng.choice(SIZES)} {color} {shape}", rng.choice(free)


def _careless_turn(scene: Scene, answer: str, check: dict, rng: random.Random) -> str:
    """``answer`` with one thing in it that is not in the scene."""
    kind = check["kind"]
    if kind == "describe":  # one more object in the list, at a free cell
        phrase, region = _invented_object(scene, rng)
        body = answer[:-1] if answer.endswith(".") else answer
        items = body.split(". the word")[0]
        rest = body[len(items):]
        parts = items.replace(" and ", ", ").split(", ")
        where = [REGIONS.index(part.rsplit(" at the ", 1)[-1]) for part in parts]
        position = sum(1 for index in where if index < REGIONS.index(region))
        parts.insert(position, f"{phrase} at the {region}")  # in reading order, as written
        return join_phrases(parts) + rest + "."
    if kind == "count" and check["value"] > 0:  # a guessed count
        wrong = check["value"] + rng.choice((1, 2))
        return capitalised(there_is(wrong, check["target"])) + "."
    if kind == "color":  # a guessed colour
        absent = [c for c in COLORS if c not in {o.color for o in scene.objects}]
        if absent:
            return f"The {check['target']['shape']} is {rng.choice(absent)}."
    phrase, region = _invented_object(scene, rng)  # anything else: an extra object
    return f"{answer} There is also {phrase} at the {region}."


def careless_annotations(records: Sequence[dict], scenes_by_id: dict, rate: float,
                         seed: int = 0, tasks: Sequence[str] = LONG_FORM_TASKS) -> list[dict]:
    """The records as a writer who never saw the images would write them: each record of
    ``tasks`` is, with probability ``rate``, given one answer that names an object, colour
    or count that is not in its scene (LLaVA-Instruct's long answers were written by a
    text-only GPT-4 from captions; its short, "academic" answers came from labelled data,
    so by default only the long-form tasks are touched). The changed record carries
    ``"annotator": {"hallucinated": True, "turn": k, "clean": <the true answer>}``; the
    checks stay the truth, so the judge flags the written answer. Deterministic in
    ``seed`` and the record's id."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"annotator hallucination rate={rate} must be in [0, 1]")
    check_tasks(tasks)
    out = []
    for record in records:
        rng = random.Random(f"careless:{seed}:{record['id']}")
        if record.get("task") not in tasks or rng.random() >= rate:
            out.append(record)
            continue
        if record["scene_id"] not in scenes_by_id:
            raise KeyError(f"record {record['id']!r}: scene {record['scene_id']} is not in "
                           "scenes_by_id")
        scene = scenes_by_id[record["scene_id"]]
        turn = rng.randrange(len(record["checks"]))
        conversations = [dict(t) for t in record["conversations"]]
        clean = conversations[2 * turn + 1]["value"]
        conversations[2 * turn + 1]["value"] = _careless_turn(scene, clean, record["checks"][turn],
                                                              rng)
        out.append({**record, "conversations": conversations,
                    "annotator": {"hallucinated": True, "turn": turn, "clean": clean}})
    return out
