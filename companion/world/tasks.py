"""LLaVA-style instruction records of the six task types of the seed's table, each
assistant turn with a check that says what a correct answer contains."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

from companion.data.llava import IMAGE_PLACEHOLDER as IMAGE_TOKEN
from companion.world.captions import canonical_caption
from companion.world.phrases import (box_text, capitalised, count_objects, count_phrase,
                                     noun_phrase, number_word, reference, there_is)
from companion.world.scenes import (ANSWER_STYLES, COLORS, SHAPES, TASK_TYPES, Scene, SceneObject,
                                    image_path)


# Each builder returns (question, answer, check). Checks are JSON-able dicts the judge reads.

DESCRIBE_QUESTIONS = ("Describe the image.", "What is in this picture?",
                      "Describe what you see.", "What does the image show?")
TOTAL_QUESTIONS = ("How many objects are there?", "How many shapes are in the image?",
                   "Count the objects in the picture.")
COUNT_QUESTIONS = ("How many {} are there?", "How many {} are in the image?", "Count the {}.")
OCR_QUESTIONS = ("What word is written in the image?", "What does the text in the image say?",
                 "Read the word in the picture.")
GROUND_QUESTIONS = ("Where is the {}?", "Find the {} and give its bounding box.", "Locate the {}.")
COMPARE_QUESTIONS = ("Are there more {} than {}?", "Does the image have more {} than {}?")
REMOVE_QUESTIONS = ("If the {} were removed, how many objects would remain?",
                    "How many objects would remain without the {}?")
SUPERLATIVE_QUESTIONS = ("Which object is the {}?", "What is the {} object in the image?")


def _object_dict(obj: SceneObject) -> dict:
    return {"size": obj.size, "color": obj.color, "shape": obj.shape}


def _description_qa(scene, rng):
    return rng.choice(DESCRIBE_QUESTIONS), canonical_caption(scene), {"kind": "describe"}


def _counting_qa(scene, rng):
    """How many (all / of a colour / of a shape / of a colour and shape); zero answers too."""
    mode = rng.choice(("total", "color", "color", "shape", "shape", "color_shape"))
    if mode == "total":
        target, question = {}, rng.choice(TOTAL_QUESTIONS)
    else:
        present = rng.random() < 0.7
        anchor = rng.choice(scene.objects)
        keys = {"color": ("color",), "shape": ("shape",), "color_shape": ("color", "shape")}[mode]
        if present:
            target = {k: getattr(anchor, k) for k in keys}
        else:
            target = {"color": rng.choice(tuple(COLORS)), "shape": rng.choice(SHAPES)}
            target = {k: target[k] for k in keys}
        question = rng.choice(COUNT_QUESTIONS).format(noun_phrase(target, plural=True))
    n = count_objects(scene, target)
    answer = capitalised(there_is(n, target)) + "."
    return question, answer, {"kind": "count", "target": target, "value": n}


def _ocr_qa(scene, rng):
    question = rng.choice(OCR_QUESTIONS)
    answer = f'The word is "{scene.word}".' if scene.word else "There is no word in the image."
    return question, answer, {"kind": "ocr", "value": scene.word}


def _ground_answer(obj: SceneObject, subject: str) -> str:
    return f"{subject} is at the {obj.region}, in box {box_text(obj.bbox)}."


def _ground_check(obj: SceneObject, target: dict) -> dict:
    return {"kind": "ground", "target": target, "object": _object_dict(obj),
            "region": obj.region, "bbox": list(obj.bbox)}


def _identify_qa(scene, rng, obj=None):
    obj = obj or rng.choice(scene.objects)
    question = rng.choice(("What is at the {}?", "What do you see at the {}?")).format(obj.region)
    answer = f"There is a {obj.size} {obj.color} {obj.shape} at the {obj.region}."
    return question, answer, {"kind": "identify", "region": obj.region, "object": _object_dict(obj)}


def _grounding_qa(scene, rng):
    """Where is <an unambiguous object>? Falls back to "what is at <region>?" if none is."""
    named = [(o, reference(scene, o)) for o in scene.objects]
    named = [(o, t) for o, t in named if t is not None]
    if not named:
        return _identify_qa(scene, rng)
    obj, target = rng.choice(named)
    name = noun_phrase(target, plural=False)
    question = rng.choice(GROUND_QUESTIONS).format(name)
    return question, _ground_answer(obj, f"The {name}"), _ground_check(obj, target)


def _compare_qa(scene, rng):
    """Are there more A than B? (A, B: two colours or two shapes, at least one present)."""
    key = rng.choice(("color", "shape"))
    values = tuple(COLORS) if key == "color" else SHAPES
    a = getattr(rng.choice(scene.objects), key)
    b = rng.choice([v for v in values if v != a])
    if rng.random() < 0.5:
        a, b = b, a
    ta, tb = {key: a}, {key: b}
    na, nb = count_objects(scene, ta), count_objects(scene, tb)
    question = rng.choice(COMPARE_QUESTIONS).format(noun_phrase(ta, True), noun_phrase(tb, True))
    verdict = "yes" if na > nb else "no"
    check = {"kind": "compare", "a": ta, "b": tb, "count_a": na, "count_b": nb, "value": verdict}
    return question, _compare_answer(check, "verdict_first"), check


def _compare_answer(check: dict, style: str) -> str:
    """"Yes, there are two X and one Y." (verdict first) or "There are two X and one Y, so
    yes." (evidence first: the counts are written before the verdict they decide)."""
    na = check["count_a"]
    evidence = (f"there {'is' if na == 1 else 'are'} {count_phrase(na, check['a'])} "
                f"and {count_phrase(check['count_b'], check['b'])}")
    if style == "evidence_first":
        return f"{capitalised(evidence)}, so {check['value']}."
    return f"{capitalised(check['value'])}, {evidence}."


def _remove_qa(scene, rng, named):
    obj, target = rng.choice(named)
    remain = len(scene.objects) - 1
    question = rng.choice(REMOVE_QUESTIONS).format(noun_phrase(target, False))
    answer = f"{capitalised('no' if remain == 0 else number_word(remain))} " \
             f"object{'s' if remain != 1 else ''} would remain."
    return question, answer, {"kind": "remove", "removed": _object_dict(obj), "value": remain}


def _superlative_qa(scene, rng, kind):
    """Which object is the largest / smallest? Asked only when exactly one object is."""
    size = "large" if kind == "largest" else "small"
    obj = next(o for o in scene.objects if o.size == size)
    target = {"color": obj.color, "shape": obj.shape}
    question = rng.choice(SUPERLATIVE_QUESTIONS).format(kind)
    answer = f"The {kind} object is the {noun_phrase(target, False)}."
    return question, answer, {"kind": kind, "object": _object_dict(obj)}


def _superlatives(scene) -> list[str]:
    kinds = []
    for kind, size in (("largest", "large"), ("smallest", "small")):
        chosen = [o for o in scene.objects if o.size == size]
        if len(chosen) == 1 and len(scene.objects) > 1 and \
                count_objects(scene, {"color": chosen[0].color, "shape": chosen[0].shape}) == 1:
            kinds.append(kind)
    return kinds


def _reasoning_qa(scene, rng):
    """Questions that combine two facts: compare two counts, count after a removal, or
    find the one object of a size."""
    named = [(o, reference(scene, o)) for o in scene.objects]
    named = [(o, t) for o, t in named if t is not None]
    options = ["compare"] + (["remove"] if named else []) + _superlatives(scene)
    choice = rng.choice(options)
    if choice == "compare":
        return _compare_qa(scene, rng)
    if choice == "remove":
        return _remove_qa(scene, rng, named)
    return _superlative_qa(scene, rng, choice)


def _dialogue_candidates(scene, rng) -> list[tuple]:
    """Single questions for a dialogue, each with follow-ups that refer back to it ("it")."""
    candidates = [(_counting_qa(scene, rng), []), (_identify_qa(scene, rng), [])]

    def follow_ups(obj, target):
        return [("Where is it?", _ground_answer(obj, "It"), _ground_check(obj, target)),
                ("Is it large or small?", f"It is {obj.size}.",
                 {"kind": "size", "target": target, "value": obj.size})]

    for shape in SHAPES:
        if count_objects(scene, {"shape": shape}) == 1:
            obj = next(o for o in scene.objects if o.shape == shape)
            qa = (f"What colour is the {shape}?", f"The {shape} is {obj.color}.",
                  {"kind": "color", "target": {"shape": shape}, "value": obj.color})
            candidates.append((qa, follow_ups(obj, {"shape": shape})))
    for color in COLORS:
        if count_objects(scene, {"color": color}) == 1:
            obj = next(o for o in scene.objects if o.color == color)
            qa = (f"What shape is the {color} object?", f"The {color} object is a {obj.shape}.",
                  {"kind": "shape", "target": {"color": color}, "value": obj.shape})
            candidates.append((qa, follow_ups(obj, {"color": color})))
    ground = _grounding_qa(scene, rng)
    if ground[2]["kind"] == "ground":
        candidates.append((ground, []))
    if scene.word:
        candidates.append((_ocr_qa(scene, rng), []))
    return candidates


def _multi_turn_qas(scene, rng):
    """Two or three rounds mixing counting, colour, shape, grounding and OCR questions."""
    candidates = _dialogue_candidates(scene, rng)
    rng.shuffle(candidates)
    rounds = rng.choice((2, 3))
    chosen, asked = [], set()
    for qa, follow in candidates:
        if len(chosen) >= rounds:
            break
        if qa[0] in asked:
            continue
        chosen.append(qa)
        asked.add(qa[0])
        if follow and len(chosen) < rounds and rng.random() < 0.5:
            chosen.append(rng.choice(follow))
    return chosen


_TASK_BUILDERS = {"description": _description_qa, "counting": _counting_qa, "ocr": _ocr_qa,
                  "reasoning": _reasoning_qa, "grounding": _grounding_qa}


def make_task_sample(scene: Scene, task: str, rng: random.Random, index: int = 0,
                     answer_style: str = "verdict_first") -> dict:
    """One LLaVA-style record of ``task`` about ``scene``.

    Returns ``{"id", "image", "task", "scene_id", "conversations", "checks"}`` where
    ``conversations`` alternate human/gpt (``<image>\\n`` opens the first human turn) and
    ``checks`` holds one dict per gpt turn: what a correct answer must contain.

    ``answer_style``: ``"verdict_first"`` answers a comparison with its verdict and then
    the counts ("Yes, there are two red objects and one square."); ``"evidence_first"``
    writes the counts first ("There are two red objects and one square, so yes."), so a
    model generating the answer has counted before it must decide. The checks, and so what
    the judge accepts, are the same for both.
    """
    if task not in TASK_TYPES:
        raise ValueError(f"unknown task {task!r}; expected one of {TASK_TYPES}")
    if answer_style not in ANSWER_STYLES:
        raise ValueError(f"unknown answer_style {answer_style!r}; expected one of "
                         f"{ANSWER_STYLES}")
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
    if task == "multi_turn":
        qas = _multi_turn_qas(scene, rng)
    else:
        qas = [_TASK_BUILDERS[task](scene, rng)]
    conversations, checks = [], []
    for turn, (question, answer, check) in enumerate(qas):
        if check["kind"] == "compare":
            answer = _compare_answer(check, answer_style)
        prefix = f"{IMAGE_TOKEN}\n" if turn == 0 else ""
        conversations.append({"from": "human", "value": prefix + question})
        conversations.append({"from": "gpt", "value": answer})
        checks.append(check)
    return {"id": f"{scene.scene_id}-{task}-{index}", "image": image_path(scene.scene_id),
            "task": task, "scene_id": scene.scene_id, "conversations": conversations,
            "checks": checks}


def check_tasks(tasks: Sequence[str]) -> None:
    unknown = [t for t in tasks if t not in TASK_TYPES]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; expected a subset of {TASK_TYPES}")


def make_instruction_dataset(scenes: Iterable[Scene], tasks: Sequence[str] = TASK_TYPES,
                             samples_per_scene: int = 1, seed: int = 0,
                             no_word_ocr_probability: float = 0.1,
                             answer_style: str = "verdict_first") -> list[dict]:
    """Records of every task in ``tasks`` for every scene, ``samples_per_scene`` each.

    OCR is asked mostly of scenes with a word: of a scene without one, only with
    probability ``no_word_ocr_probability`` (the answer is then "There is no word ...").
    Each scene has its own random stream, so the records of a scene do not depend on the
    other scenes. Scene-major order.
    """
    check_tasks(tasks)
    records = []
    for scene in scenes:
        rng = random.Random(f"tasks:{seed}:{scene.scene_id}")
        for task in tasks:
            for k in range(samples_per_scene):
                if task == "ocr" and not scene.word and rng.random() >= no_word_ocr_probability:
                    continue
                records.append(make_task_sample(scene, task, rng, index=k,
                                                answer_style=answer_style))
    return records


def merge_records(records: Sequence[dict], per_conversation: int, seed: int = 0) -> list[dict]:
    """Several questions about one scene in one conversation, as LLaVA's own conversation
    data asks them: the records of each scene are shuffled (deterministic in ``seed`` and
    the scene) and joined ``per_conversation`` at a time into one multi-turn record whose
    image is given once, at the start. Checks follow the turns; ``task`` lists the joined
    records' tasks with "+", ``merged`` their ids. ``per_conversation=1`` returns the
    records unchanged. The scene's image (or its description) is then read once for every
    answer, so far more of each sequence carries loss."""
    if per_conversation < 1:
        raise ValueError(f"per_conversation={per_conversation} must be at least 1")
    if per_conversation == 1:
        return list(records)
    by_scene: dict = {}
    for record in records:
        by_scene.setdefault(record["scene_id"], []).append(record)
    merged = []
    for scene_id, group in by_scene.items():
        group = list(group)
        random.Random(f"merge:{seed}:{scene_id}").shuffle(group)
        for start in range(0, len(group), per_conversation):
            part = group[start:start + per_conversation]
            conversations = []
            for k, record in enumerate(part):
                turns = [dict(turn) for turn in record["conversations"]]
                if k > 0:  # the image is given once, in the first question
                    turns[0]["value"] = turns[0]["value"].replace(f"{IMAGE_TOKEN}\n", "", 1)
                conversations += turns
            merged.append({"id": "+".join(r["id"] for r in part), "image": part[0]["image"],
                           "task": "+".join(r["task"] for r in part), "scene_id": scene_id,
                           "conversations": conversations,
                           "checks": [c for r in part for c in r["checks"]],
                           "merged": [r["id"] for r in part]})
    return merged
