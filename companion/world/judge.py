"""The judge: whether an answer passes its check, and which objects, colours, counts or
words it states that are not in the scene (its hallucinations)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from companion.world.parser import parse_answer
from companion.world.phrases import (count_objects, count_phrase, number_word, object_matches,
                                     with_article)
from companion.world.scenes import CHECK_KINDS, Scene


@dataclass
class JudgeResult:
    """The judge's verdict on one answer.

    ``correct``: the answer passes the check; ``score`` in [0, 1] (partial credit);
    ``hallucinations``: claims about things that are not in the scene, one sentence each;
    ``mentioned``: what the parser read (see :func:`parse_answer`).
    """

    correct: bool
    score: float
    hallucinations: list[str] = field(default_factory=list)
    mentioned: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Correct and free of hallucinations."""
        return self.correct and not self.hallucinations


def _phrase_target(phrase: dict) -> dict:
    return {k: phrase[k] for k in ("size", "color", "shape") if phrase.get(k)}


def _phrase_text(phrase: dict) -> str:
    words = [phrase.get("size"), phrase.get("color") or phrase.get("foreign_color"),
             phrase.get("shape") or phrase.get("foreign_shape") or "object"]
    return " ".join(w for w in words if w)


def _positive(phrase: dict) -> bool:
    return not phrase["negated"] and phrase["number"] != 0


def _is_foreign(phrase: dict) -> bool:
    return bool(phrase.get("foreign_shape") or phrase.get("foreign_color"))


def _hallucinations(scene: Scene, parsed: dict, count_scene: Scene) -> list[str]:
    """Objects, colours, counts and words the answer claims that the scene does not have.

    Count claims ("three objects") are checked against ``count_scene``: the scene itself,
    or the scene after a removal for a "how many would remain" question.
    """
    found = []
    for phrase in parsed["phrases"]:
        text = _phrase_text(phrase)
        if _is_foreign(phrase):
            if _positive(phrase):
                found.append(f"mentions {with_article(text)}, which is not in the scene")
            continue
        target = _phrase_target(phrase)
        if phrase["number"] is not None:
            truth = count_objects(count_scene, target)
            if truth != phrase["number"]:
                there = "there is one" if truth == 1 else f"there are {number_word(truth)}" \
                    if truth else "there are none"
                found.append(f"claims {count_phrase(phrase['number'], target)}, but {there}")
        elif target and count_objects(scene, target) == 0:
            found.append(f"mentions {with_article(text)}, which is not in the scene")
    scene_colors = {o.color for o in scene.objects}
    for color in dict.fromkeys(parsed["standalone_colors"]):
        if color not in scene_colors:
            found.append(f"says something is {color}, but nothing in the scene is {color}")
    for item in parsed["words"]:
        if item["quoted"] and (scene.word is None or item["word"].upper() != scene.word.upper()):
            found.append(f'mentions the word "{item["word"]}", which is not in the image')
    return found


def _object_f1(scene: Scene, parsed: dict) -> float:
    """F1 of the (colour, shape) objects an answer mentions against the scene's, with
    multiplicity ("two red circles" counts twice); a mention without a colour matches any."""
    mentions = []
    for phrase in parsed["phrases"]:
        if _positive(phrase) and (phrase["shape"] or phrase["foreign_shape"]):
            copies = min(phrase["number"] or 1, 9)
            key = (phrase["color"] or phrase["foreign_color"],
                   phrase["shape"] or phrase["foreign_shape"])
            mentions += [key] * copies
    free = [(o.color, o.shape) for o in scene.objects]
    matched, rest = 0, []
    for key in mentions:  # exact matches first, then colour-less wildcards
        if key in free:
            free.remove(key)
            matched += 1
        else:
            rest.append(key)
    for color, shape in rest:
        hit = next((k for k in free if color is None and k[1] == shape), None)
        if hit is not None:
            free.remove(hit)
            matched += 1
    if not mentions or not scene.objects:
        return 0.0
    precision, recall = matched / len(mentions), matched / len(scene.objects)
    return 0.0 if matched == 0 else 2 * precision * recall / (precision + recall)


def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    if len(a) != 4 or len(b) != 4:
        return 0.0
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) \
        + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _first_object_phrase(parsed: dict) -> dict | None:
    return next((p for p in parsed["phrases"]
                 if _positive(p) and (p["shape"] or p["foreign_shape"])), None)


def _compatible(phrase: dict, obj: dict) -> bool:
    """Every attribute the phrase states agrees with ``obj`` ({size, color, shape})."""
    if _is_foreign(phrase):
        return False
    return all(obj.get(k) == v for k, v in _phrase_target(phrase).items())


def _claim(parsed: dict, target: dict) -> int | None:
    """The number an answer states for ``target`` ("two red objects" → 2), if it does."""
    wanted = {k: v for k, v in target.items() if v}
    for phrase in parsed["phrases"]:
        if phrase["number"] is not None and not _is_foreign(phrase) \
                and _phrase_target(phrase) == wanted:
            return phrase["number"]
    return None


def _stated_number(parsed: dict, target: dict) -> int | None:
    """The answer's count for ``target``; a bare number ("Three.") if it makes no count claim."""
    claim = _claim(parsed, target)
    if claim is not None:
        return claim
    if parsed["numbers"] and not any(p["number"] is not None for p in parsed["phrases"]):
        return parsed["numbers"][0]
    return None


def _judge_count(scene, parsed, check):
    return _stated_number(parsed, check["target"]) == check["value"], None


def _judge_remove(scene, parsed, check):
    return _stated_number(parsed, {}) == check["value"], None


def _judge_ocr(scene, parsed, check):
    quoted = [w["word"] for w in parsed["words"] if w["quoted"]]
    capitals = [w["word"] for w in parsed["words"] if not w["quoted"]]
    stated = (quoted or capitals or [None])[0]
    if check["value"] is None:
        return parsed["no_word"] and not quoted, None
    return (stated is not None and stated.upper() == check["value"].upper()
            and not parsed["no_word"]), None


def _judge_describe(scene, parsed, check):
    f1 = _object_f1(scene, parsed)
    return f1 == 1.0, f1  # and no hallucination: added by judge_answer


def _judge_ground(scene, parsed, check):
    parts = [bool(parsed["regions"]) and parsed["regions"][0]["region"] == check["region"]]
    if parsed["boxes"]:
        parts.append(_box_iou(parsed["boxes"][0], check["bbox"]) >= 0.5)
    phrase = _first_object_phrase(parsed)
    if phrase is not None:
        parts.append(_compatible(phrase, check["object"]))
    return all(parts), sum(parts) / len(parts)


def _judge_identify(scene, parsed, check):
    """"What is at <region>?" / "Which object is the largest?": name the right object."""
    phrase = _first_object_phrase(parsed)
    if phrase is None:
        return False, 0.0
    obj = check["object"]
    parts = [phrase["shape"] == obj["shape"], phrase["color"] == obj["color"]]
    if phrase["size"]:
        parts.append(phrase["size"] == obj["size"])
    if check["kind"] == "identify" and parsed["regions"]:
        parts.append(parsed["regions"][0]["region"] == check["region"])
    return all(parts), sum(parts) / len(parts)


def _judge_compare(scene, parsed, check):
    parts = [parsed["yes_no"] == check["value"]]
    for key in ("a", "b"):
        stated = _claim(parsed, check[key])
        if stated is not None:
            parts.append(stated == check[f"count_{key}"])
    return all(parts), sum(parts) / len(parts)


def _judge_attribute(scene, parsed, check):
    """"What colour is the square?" and friends: exactly the right colour / shape / size."""
    said = set(parsed[{"color": "colors", "shape": "shapes", "size": "sizes"}[check["kind"]]])
    return said == {check["value"]}, None


_KIND_JUDGES = {"describe": _judge_describe, "count": _judge_count, "ocr": _judge_ocr,
                "compare": _judge_compare, "remove": _judge_remove, "largest": _judge_identify,
                "smallest": _judge_identify, "identify": _judge_identify, "ground": _judge_ground,
                "color": _judge_attribute, "shape": _judge_attribute, "size": _judge_attribute}


def judge_answer(scene: Scene, answer: str, check: dict) -> JudgeResult:
    """Score a free-text ``answer`` about ``scene`` against one ``check`` of a record.

    Never raises on the answer (empty or garbage text is simply incorrect); raises
    ValueError for a check of unknown kind.
    """
    kind = check.get("kind") if isinstance(check, dict) else None
    if kind not in _KIND_JUDGES:
        raise ValueError(f"check {check!r} has no known kind; expected one of {CHECK_KINDS}")
    parsed = parse_answer(answer)
    count_scene = scene
    if kind == "remove":  # "three objects would remain" is a claim about the scene without it
        removed = check["removed"]
        gone = next((o for o in scene.objects if object_matches(o, removed)), None)
        count_scene = Scene(scene.scene_id, tuple(o for o in scene.objects if o is not gone))
    hallucinations = _hallucinations(scene, parsed, count_scene)
    correct, score = _KIND_JUDGES[kind](scene, parsed, check)
    correct = bool(correct) and not (kind == "describe" and hallucinations)
    score = float(correct) if score is None else float(score)
    return JudgeResult(correct, score, hallucinations, parsed)


@dataclass
class ConversationResult:
    """Verdicts on every assistant turn of a record."""

    turns: list[JudgeResult]
    correct: bool   # every turn correct
    score: float    # mean turn score
    hallucinations: list[str]  # "turn 2: mentions ..."


def judge_conversation(scene: Scene, record: dict, answers: Sequence[str]) -> ConversationResult:
    """Judge ``answers`` (one per gpt turn, in order) against the record's checks."""
    checks = record.get("checks", [])
    if len(answers) != len(checks):
        raise ValueError(f"record {record.get('id')!r} has {len(checks)} checked turns but "
                         f"{len(answers)} answers were given")
    turns = [judge_answer(scene, answer, check) for answer, check in zip(answers, checks)]
    hallucinations = [f"turn {k + 1}: {h}" for k, t in enumerate(turns) for h in t.hallucinations]
    score = sum(t.score for t in turns) / len(turns) if turns else 0.0
    return ConversationResult(turns, all(t.correct for t in turns) and bool(turns), score,
                              hallucinations)


@dataclass
class DescriptionScore:
    """Attribute-level facts of a description: each object has four (size, colour, shape,
    region), the word two (its text and its region)."""

    precision: float  # correct facts / facts stated
    recall: float     # correct facts / facts in the scene
    f1: float
    stated: int
    correct: int
    total: int


def _attachments(parsed: dict) -> tuple[dict[int, list[str]], dict[int, int], list[dict]]:
    """``(regions by clause, object mentions by clause, object mentions)`` of a parsed answer:
    what attaches a region to the object named in the same clause."""
    regions_by_clause: dict[int, list[str]] = {}
    for item in parsed["regions"]:
        regions_by_clause.setdefault(item["clause"], []).append(item["region"])
    mentions = [p for p in parsed["phrases"] if _positive(p) and (p["shape"] or p["foreign_shape"])]
    phrases_by_clause: dict[int, int] = {}
    for phrase in mentions:
        phrases_by_clause[phrase["clause"]] = phrases_by_clause.get(phrase["clause"], 0) + 1
    return regions_by_clause, phrases_by_clause, mentions


def described_objects(parsed: dict) -> list[dict]:
    """The objects a parsed answer (:func:`parse_answer`) mentions, in order, each as the
    facts it states: ``shape`` always, ``size`` and ``color`` when said, and ``region`` when
    the mention's clause names exactly one region and no other object (clauses split at
    punctuation and "and")."""
    regions_by_clause, phrases_by_clause, mentions = _attachments(parsed)
    facts = []
    for phrase in mentions:
        stated = {"shape": phrase["shape"] or phrase["foreign_shape"]}
        for key in ("size", "color"):
            value = phrase[key] or (phrase["foreign_color"] if key == "color" else None)
            if value:
                stated[key] = value
        regions = regions_by_clause.get(phrase["clause"], [])
        if len(regions) == 1 and phrases_by_clause[phrase["clause"]] == 1:
            stated["region"] = regions[0]
        facts.append(stated)
    return facts


def judge_description(scene: Scene, answer: str) -> DescriptionScore:
    """Precision and recall of the facts a caption states, for captioning metrics.

    Each mentioned object ("a large red circle at the top left") states up to four facts;
    a region is attached to the object of its clause (clauses split at punctuation and
    "and"). Mentions are paired with scene objects greedily by agreeing facts.
    """
    parsed = parse_answer(answer)
    regions_by_clause, phrases_by_clause, _ = _attachments(parsed)
    facts = described_objects(parsed)
    truth = [{"size": o.size, "color": o.color, "shape": o.shape, "region": o.region}
             for o in scene.objects]
    pairs = sorted(((-sum(truth[t].get(k) == v for k, v in f.items()), m, t)
                    for m, f in enumerate(facts) for t in range(len(truth))))
    used_m, used_t, correct = set(), set(), 0
    for negative, m, t in pairs:
        if negative < 0 and m not in used_m and t not in used_t:
            used_m.add(m)
            used_t.add(t)
            correct -= negative
    stated_count = sum(len(f) for f in facts)
    word_found = False
    for item in (w for w in parsed["words"] if w["quoted"]):
        stated_count += 1
        right = (scene.word is not None and item["word"].upper() == scene.word.upper()
                 and not word_found)
        correct += right
        regions = regions_by_clause.get(item["clause"], [])
        if len(regions) == 1 and item["clause"] not in phrases_by_clause:
            stated_count += 1
            correct += right and regions[0] == scene.word_region
        word_found = word_found or right
    total = 4 * len(scene.objects) + (2 if scene.word else 0)
    precision = correct / stated_count if stated_count else 0.0
    recall = correct / total if total else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return DescriptionScore(precision, recall, f1, stated_count, correct, total)
