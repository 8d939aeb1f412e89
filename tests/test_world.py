"""The shapes world: determinism, configuration, task records and the judge."""

import hashlib
import json
import random

import pytest

from companion.data.llava import validate_llava_records
from companion.world import (
    LONG_FORM_TASKS, careless_annotations,
    COLORS, REGIONS, SHAPES, TASK_TYPES, WORDS, Scene, SceneObject, WorldConfig,
    canonical_caption, count_phrase, judge_answer, judge_conversation, judge_description,
    make_caption_pairs, make_instruction_dataset, make_scenes, make_task_sample, merge_records,
    render_scene,
    scene_captions, scene_png_bytes,
)

# A hand-made scene: two red circles (large and small), a blue square, the word CAT.
SCENE = Scene(
    scene_id=7,
    objects=(
        SceneObject("square", "blue", "small", "bottom right", (0.7, 0.7, 0.85, 0.85)),
        SceneObject("circle", "red", "large", "top left", (0.05, 0.04, 0.31, 0.30)),
        SceneObject("circle", "red", "small", "center", (0.40, 0.40, 0.55, 0.55)),
    ),
    word="CAT", word_region="right")
FULL_CAPTION = ('a large red circle at the top left, a small red circle at the center and a '
                'small blue square at the bottom right. the word "CAT" is written at the right.')


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(200, seed=3)


@pytest.fixture(scope="module")
def records(scenes):
    return make_instruction_dataset(scenes, tasks=TASK_TYPES, samples_per_scene=1, seed=5)


# ----------------------------------------------------------------------------- scenes

def test_same_seed_same_scenes_other_seed_other_scenes():
    assert make_scenes(50, seed=1) == make_scenes(50, seed=1)
    assert make_scenes(50, seed=1) != make_scenes(50, seed=2)


def test_scene_does_not_depend_on_how_many_are_made():
    assert make_scenes(30, seed=4)[10:] == make_scenes(20, seed=4, start_id=10)


def test_scene_invariants(scenes):
    for scene in scenes:
        assert 1 <= len(scene.objects) <= 4
        regions = [o.region for o in scene.objects]
        assert regions == sorted(regions, key=REGIONS.index) and len(set(regions)) == len(regions)
        for obj in scene.objects:
            assert obj.shape in SHAPES and obj.color in COLORS
            x0, y0, x1, y1 = obj.bbox
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            row, column = divmod(REGIONS.index(obj.region), 3)  # the box lies in its cell
            assert column / 3 <= x0 and x1 <= (column + 1) / 3 + 1e-9
            assert row / 3 <= y0 and y1 <= (row + 1) / 3 + 1e-9
            assert all(round(v, 3) == v for v in obj.bbox)
            side = (x1 - x0) * 3
            assert (0.7 < side < 0.95) if obj.size == "large" else (0.4 < side < 0.6)
        if scene.word is not None:
            assert scene.word in WORDS and scene.word_region not in regions
    assert 0.15 < sum(s.word is not None for s in scenes) / len(scenes) < 0.45


def test_scene_dict_round_trip(scenes):
    for scene in scenes[:20]:
        data = json.loads(json.dumps(scene.to_dict()))
        assert Scene.from_dict(data) == scene


def test_config_changes_the_sampling():
    config = WorldConfig(min_objects=6, max_objects=8, word_probability=1.0)
    for scene in make_scenes(20, config=config):
        assert 6 <= len(scene.objects) <= 8 and scene.word is not None


@pytest.mark.parametrize("kwargs, message", [
    ({"min_objects": 0}, "min_objects"),
    ({"max_objects": 9}, "max_objects"),
    ({"min_objects": 4, "max_objects": 2}, "exceeds"),
    ({"image_size": 8}, "image_size"),
    ({"word_probability": 1.5}, "word_probability"),
    ({"word_probability": -0.1}, "word_probability"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WorldConfig(**kwargs)


def test_invalid_scene_objects_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        SceneObject("star", "red", "large", "top", (0, 0, 0.1, 0.1))
    obj = SceneObject("circle", "red", "large", "top", (0.4, 0, 0.6, 0.2))
    with pytest.raises(ValueError, match="share a cell"):
        Scene(0, (obj, obj))
    with pytest.raises(ValueError, match="free cell"):
        Scene(0, (obj,), word="CAT", word_region="top")


# ----------------------------------------------------------------------------- rendering

def test_render_is_deterministic_byte_for_byte():
    scene = make_scenes(1, seed=11)[0]
    first, second = render_scene(scene, 64), render_scene(scene, 64)
    assert first.mode == "RGB" and first.size == (64, 64)
    assert first.tobytes() == second.tobytes()
    digest = hashlib.md5(scene_png_bytes(scene, 64)).hexdigest()
    assert digest == hashlib.md5(scene_png_bytes(scene, 64)).hexdigest()


def test_bytes_do_not_depend_on_the_process():
    """Another interpreter with another hash seed builds the same PNG and dataset bytes."""
    import os
    import subprocess
    import sys

    program = ("import hashlib, json; from companion.world import *; "
               "s = make_scenes(40, seed=2); "
               "print(hashlib.md5(scene_png_bytes(s[3], 64)).hexdigest(), "
               "hashlib.md5(json.dumps(make_instruction_dataset(s, seed=1)).encode()).hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    scenes = make_scenes(40, seed=2)
    dataset = json.dumps(make_instruction_dataset(scenes, seed=1)).encode()
    assert out == [hashlib.md5(scene_png_bytes(scenes[3], 64)).hexdigest(),
                   hashlib.md5(dataset).hexdigest()]


def test_render_draws_colours_and_the_word():
    image = render_scene(SCENE, 96)
    # the centre of the large red circle's box is red; the word's cell has black pixels
    assert image.getpixel((int(0.18 * 96), int(0.17 * 96))) == COLORS["red"]
    cell = image.crop((64, 32, 96, 64))
    assert cell.convert("L").getextrema()[0] < 40
    empty = render_scene(Scene(7, SCENE.objects), 96).crop((64, 32, 96, 64))
    assert empty.convert("L").getextrema()[0] > 200


def test_different_scenes_render_differently():
    a, b = make_scenes(2, seed=0)
    assert render_scene(a, 32).tobytes() != render_scene(b, 32).tobytes()


# ----------------------------------------------------------------------------- captions

def test_captions():
    captions = scene_captions(SCENE)
    assert len(captions) >= 4 and len(set(captions)) == len(captions)
    assert captions[0] == canonical_caption(SCENE) == FULL_CAPTION
    assert captions[1].startswith("three shapes: a large red circle, a small red circle")
    for caption in captions:
        assert caption.replace("CAT", "cat") == caption.lower()
        assert 'the word "CAT" is written at the right.' in caption
        # every phrasing lists the objects in reading order and judges as a full description
        assert caption.index("large red circle") < caption.index("blue square")
        assert judge_answer(SCENE, caption, {"kind": "describe"}).passed


def test_caption_pairs_are_deterministic(scenes):
    pairs = make_caption_pairs(scenes[:10], seed=1, per_scene=2)
    assert pairs == make_caption_pairs(scenes[:10], seed=1, per_scene=2)
    assert len(pairs) == 20
    for image_index, caption, caption_id in pairs:
        assert scene_captions(scenes[image_index])[caption_id] == caption


# ----------------------------------------------------------------------------- instruction data

def test_dataset_json_is_identical_across_builds(scenes):
    def build():
        data = make_instruction_dataset(make_scenes(60, seed=9), seed=2)
        return json.dumps(data, ensure_ascii=False).encode()
    assert build() == build()
    assert build() != json.dumps(make_instruction_dataset(make_scenes(60, seed=9), seed=3)).encode()


def test_every_task_gives_valid_records(records):
    validate_llava_records(records, check_images=False)
    seen = set()
    for record in records:
        seen.add(record["task"])
        turns = record["conversations"]
        gpt_turns = [t for t in turns if t["from"] == "gpt"]
        assert len(record["checks"]) == len(gpt_turns) >= 1
        assert turns[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in turns[1:])
        assert record["image"] == f"images/scene_{record['scene_id']:06d}.png"
        assert record["id"] == f"{record['scene_id']}-{record['task']}-0"
        json.dumps(record["checks"])  # JSON-able
        if record["task"] == "multi_turn":
            assert 2 <= len(gpt_turns) <= 3
        else:
            assert len(gpt_turns) == 1
    assert seen == set(TASK_TYPES)


def test_ocr_is_asked_mostly_of_scenes_with_a_word(scenes, records):
    by_id = {s.scene_id: s for s in scenes}
    ocr = [r for r in records if r["task"] == "ocr"]
    with_word = sum(by_id[r["scene_id"]].word is not None for r in ocr)
    assert with_word == sum(s.word is not None for s in scenes)  # every scene with a word
    assert with_word / len(ocr) > 0.6


def test_counting_includes_zero_answers(records):
    answers = [r["conversations"][1]["value"] for r in records if r["task"] == "counting"]
    assert any(" no " in a for a in answers) and any(" one " in a for a in answers)


def test_questions_name_only_unambiguous_objects(scenes, records):
    by_id = {s.scene_id: s for s in scenes}
    for record in records:
        scene = by_id[record["scene_id"]]
        for check in record["checks"]:
            if check["kind"] == "ground":
                matching = [o for o in scene.objects
                            if all(getattr(o, k) == v for k, v in check["target"].items())]
                assert len(matching) == 1


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match="unknown task"):
        make_task_sample(SCENE, "poetry", random.Random(0))


# ----------------------------------------------------------------------------- the judge

def test_reference_answers_pass_their_own_judge(scenes, records):
    by_id = {s.scene_id: s for s in scenes}
    kinds = set()
    for record in records:
        answers = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
        for answer, check in zip(answers, record["checks"]):
            result = judge_answer(by_id[record["scene_id"]], answer, check)
            assert result.correct and not result.hallucinations, (record, answer, result)
            assert result.score == 1.0
            kinds.add(check["kind"])
        verdict = judge_conversation(by_id[record["scene_id"]], record, answers)
        assert verdict.correct and not verdict.hallucinations
    assert {"describe", "count", "ocr", "compare", "remove", "ground", "color", "shape"} <= kinds


def test_evidence_first_answers_write_the_counts_before_the_verdict_and_pass_the_same_judge(
        scenes, records):
    evidence = make_instruction_dataset(scenes, tasks=TASK_TYPES, samples_per_scene=1, seed=5,
                                        answer_style="evidence_first")
    by_id = {s.scene_id: s for s in scenes}
    changed = 0
    for plain, record in zip(records, evidence):
        assert plain["checks"] == record["checks"] and plain["id"] == record["id"]
        for k, check in enumerate(record["checks"]):
            before = plain["conversations"][2 * k + 1]["value"]
            after = record["conversations"][2 * k + 1]["value"]
            if check["kind"] != "compare":
                assert after == before
                continue
            changed += 1
            # "Yes, there are two red objects and one square." ->
            # "There are two red objects and one square, so yes."
            verdict, _, rest = before.partition(", ")
            assert after == f"{rest[0].upper()}{rest[1:-1]}, so {verdict.lower()}."
            result = judge_answer(by_id[record["scene_id"]], after, check)
            assert result.correct and not result.hallucinations and result.score == 1.0, after
            flipped = after[:-len(check["value"]) - 1] + ("no." if check["value"] == "yes"
                                                          else "yes.")
            assert not judge_answer(by_id[record["scene_id"]], flipped, check).correct, flipped
    assert changed > 20
    with pytest.raises(ValueError, match="unknown answer_style 'chatty'"):
        make_task_sample(SCENE, "reasoning", random.Random(0), answer_style="chatty")


def test_merged_records_ask_several_questions_about_one_scene_with_the_image_once(scenes,
                                                                                records):
    merged = merge_records(records, 3, seed=0)
    assert merge_records(records, 3, seed=0) == merged  # deterministic
    assert merge_records(records, 1) == records
    by_id = {r["id"]: r for r in records}
    assert sorted(i for m in merged for i in m["merged"]) == sorted(by_id)
    for record in merged:
        parts = [by_id[i] for i in record["merged"]]
        assert 1 <= len(parts) <= 3 and {p["scene_id"] for p in parts} == {record["scene_id"]}
        assert record["task"] == "+".join(p["task"] for p in parts)
        assert record["checks"] == [c for p in parts for c in p["checks"]]
        turns = record["conversations"]
        assert sum(t["value"].count("<image>") for t in turns) == 1
        assert turns[0]["value"].startswith("<image>\n")
        expected = [t["value"] for p in parts for t in p["conversations"]]
        assert [t["value"] for t in turns] == [expected[0]] + [
            v.replace("<image>\n", "", 1) for v in expected[1:]]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    validate_llava_records(merged)
    with pytest.raises(ValueError, match="per_conversation=0 must be at least 1"):
        merge_records(records, 0)


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_the_careless_annotator_hallucinates_at_its_rate_and_the_judge_sees_every_one(rate):
    scenes = make_scenes(1500, seed=21)
    by_id = {s.scene_id: s for s in scenes}
    records = make_instruction_dataset(scenes, seed=21)
    written = careless_annotations(records, by_id, rate, seed=2)
    assert careless_annotations(records, by_id, rate, seed=2) == written  # deterministic
    eligible = [w for w in written if w["task"] in LONG_FORM_TASKS]
    changed = [w for w in written if w.get("annotator")]
    assert {w["task"] for w in changed} <= set(LONG_FORM_TASKS)
    share, n = len(changed) / len(eligible), len(eligible)
    assert abs(share - rate) <= 3 * (rate * (1 - rate) / n) ** 0.5, (share, rate, n)
    kinds = set()
    for clean, record in zip(records, written):
        assert record["checks"] == clean["checks"]
        note = record.get("annotator")
        for k, check in enumerate(record["checks"]):
            answer = record["conversations"][2 * k + 1]["value"]
            if note is None or k != note["turn"]:
                assert answer == clean["conversations"][2 * k + 1]["value"]
                continue
            assert note["clean"] == clean["conversations"][2 * k + 1]["value"] != answer
            verdict = judge_answer(by_id[record["scene_id"]], answer, check)
            assert verdict.hallucinations and not verdict.passed, (answer, check)
            kinds.add(check["kind"])
    assert {"describe", "count", "color"} <= kinds


def test_the_careless_annotator_refuses_impossible_settings():
    scenes = make_scenes(5, seed=1)
    by_id = {s.scene_id: s for s in scenes}
    records = make_instruction_dataset(scenes, seed=1)
    assert careless_annotations(records, by_id, 0.0) == records
    every = careless_annotations(records, by_id, 1.0, tasks=("description",))
    assert all(bool(r.get("annotator")) == (r["task"] == "description") for r in every)
    with pytest.raises(ValueError, match=r"rate=1.5 must be in \[0, 1\]"):
        careless_annotations(records, by_id, 1.5)
    with pytest.raises(ValueError, match="unknown task"):
        careless_annotations(records, by_id, 0.5, tasks=("poetry",))
    with pytest.raises(KeyError, match="scene .* is not in scenes_by_id"):
        careless_annotations(records, {}, 1.0)


def test_perturbed_reference_answers_fail(scenes, records):
    """Change one fact of each reference answer (count, word, region, colour): incorrect."""
    by_id = {s.scene_id: s for s in scenes}
    tried = 0
    for record in records:
        scene = by_id[record["scene_id"]]
        for check in record["checks"]:
            kind = check["kind"]
            if kind == "count":
                wrong = f"There are {count_phrase(check['value'] + 1, check['target'])}."
            elif kind == "ocr" and check["value"]:
                wrong = f'The word is "{next(w for w in WORDS if w != check["value"])}".'
            elif kind == "ground":
                region = next(r for r in REGIONS if r != check["region"])
                wrong = f"It is at the {region}."
            elif kind == "color":
                wrong = f"It is {next(c for c in COLORS if c != check['value'])}."
            else:
                continue
            result = judge_answer(scene, wrong, check)
            assert not result.correct, (wrong, check)
            if kind in ("count", "ocr"):
                assert result.hallucinations, (wrong, check)
            tried += 1
    assert tried > 200


COUNT_RED = {"kind": "count", "target": {"color": "red"}, "value": 2}
NO_TRIANGLES = {"kind": "count", "target": {"shape": "triangle"}, "value": 0}
SQUARE_COLOR = {"kind": "color", "target": {"shape": "square"}, "value": "blue"}
GROUND_SQUARE = {"kind": "ground", "target": {"color": "blue", "shape": "square"},
                 "object": {"size": "small", "color": "blue", "shape": "square"},
                 "region": "bottom right", "bbox": [0.7, 0.7, 0.85, 0.85]}


@pytest.mark.parametrize("answer, check, correct", [
    ("There are two red objects.", COUNT_RED, True),
    ("2", COUNT_RED, True),
    ("There are three red objects.", COUNT_RED, False),           # wrong count
    ("There is one red object.", COUNT_RED, False),
    ("There are two blue objects.", COUNT_RED, False),            # counts the wrong thing
    ("There are no triangles.", NO_TRIANGLES, True),
    ('The word is "CAT".', {"kind": "ocr", "value": "CAT"}, True),
    ("The word is CAT.", {"kind": "ocr", "value": "CAT"}, True),
    ('The word is "DOG".', {"kind": "ocr", "value": "CAT"}, False),  # wrong word
    ("There is no word in the image.", {"kind": "ocr", "value": "CAT"}, False),
    ("There is no word in the image.", {"kind": "ocr", "value": None}, True),
    ("The blue square is at the bottom right, in box [0.70, 0.70, 0.85, 0.85].", GROUND_SQUARE,
     True),
    ("It is at the bottom right.", GROUND_SQUARE, True),
    ("The blue square is at the top left, in box [0.70, 0.70, 0.85, 0.85].", GROUND_SQUARE, False),
    ("The blue square is at the bottom right, in box [0.10, 0.10, 0.25, 0.25].", GROUND_SQUARE,
     False),                                                         # box IoU 0
    ("The square is blue.", SQUARE_COLOR, True),
    ("The square is red.", SQUARE_COLOR, False),                    # wrong colour
    ("Yes, there are two red objects and one blue object.",
     {"kind": "compare", "a": {"color": "red"}, "b": {"color": "blue"}, "count_a": 2,
      "count_b": 1, "value": "yes"}, True),
    ("No, there are two red objects and one blue object.",
     {"kind": "compare", "a": {"color": "red"}, "b": {"color": "blue"}, "count_a": 2,
      "count_b": 1, "value": "yes"}, False),
    ("Yes, there are three red objects and one blue object.",
     {"kind": "compare", "a": {"color": "red"}, "b": {"color": "blue"}, "count_a": 2,
      "count_b": 1, "value": "yes"}, False),
    ("Two objects would remain.",
     {"kind": "remove", "removed": {"size": "small", "color": "blue", "shape": "square"},
      "value": 2}, True),
    ("Three objects would remain.",
     {"kind": "remove", "removed": {"size": "small", "color": "blue", "shape": "square"},
      "value": 2}, False),
    ("The largest object is the red circle.",
     {"kind": "largest", "object": {"size": "large", "color": "red", "shape": "circle"}}, True),
    ("The largest object is the blue square.",
     {"kind": "largest", "object": {"size": "large", "color": "red", "shape": "circle"}}, False),
    ("It is small.", {"kind": "size", "target": {"shape": "square"}, "value": "small"}, True),
    ("It is large.", {"kind": "size", "target": {"shape": "square"}, "value": "small"}, False),
])
def test_judge_verdicts(answer, check, correct):
    assert judge_answer(SCENE, answer, check).correct is correct


@pytest.mark.parametrize("answer, expected", [
    ("There are two red objects and a green triangle.", "green triangle"),  # combination absent
    ("I see a purple diamond.", "purple diamond"),                          # both absent
    ("The square is green.", "green"),                                      # colour absent
    ("There is a star at the top.", "star"),                                # not a world shape
    ("There are five objects.", "claims five objects"),                     # wrong count claim
    ("There are two squares.", "claims two squares"),
    ("There is no blue square.", "claims no blue squares"),
    ('The word is "DOG".', '"DOG"'),                                       # word not in the image
    ("a small red circle at the top left and a large red circle at the center.", None),
])
def test_hallucinations_are_flagged(answer, expected):
    result = judge_answer(SCENE, answer, COUNT_RED)
    if expected is None:  # both exist in the scene (at other places): not a hallucination
        assert result.hallucinations == []
    else:
        assert any(expected in h for h in result.hallucinations), result.hallucinations


def test_hypothetical_counts_are_not_hallucinations():
    check = {"kind": "remove", "removed": {"size": "large", "color": "red", "shape": "circle"},
             "value": 2}
    assert judge_answer(SCENE, "Two objects would remain.", check).passed
    result = judge_answer(SCENE, "Three objects would remain.", check)
    assert result.hallucinations  # claims three of the two remaining


def test_describe_scores_objects_by_f1():
    assert judge_answer(SCENE, FULL_CAPTION, {"kind": "describe"}).score == 1.0
    partial = judge_answer(SCENE, "a large red circle at the top left.", {"kind": "describe"})
    assert not partial.correct and partial.score == pytest.approx(0.5)  # P 1, R 1/3
    wrong = judge_answer(SCENE, FULL_CAPTION + " a green triangle.", {"kind": "describe"})
    assert not wrong.correct and wrong.hallucinations
    # every object right (F1 = 1), but a false count claim: still not a correct description
    miscounted = judge_answer(SCENE, FULL_CAPTION + " there are five objects.",
                              {"kind": "describe"})
    assert miscounted.score == 1.0 and miscounted.hallucinations and not miscounted.correct


@pytest.mark.parametrize("garbage", ["", "   ", "zzz qqq 12 [ ] \" ' ,,", "[0.1, 0.2, 0.3]",
                                     "no no no yes", "Ω≈ç√∫ 🙂", "3" * 500, None, 42,
                                     '"unterminated', "-1 objects at the top top left left"])
def test_garbage_never_crashes(garbage):
    checks = [{"kind": "describe"}, COUNT_RED, {"kind": "ocr", "value": "CAT"},
              {"kind": "ocr", "value": None}, GROUND_SQUARE, SQUARE_COLOR]
    for check in checks:
        result = judge_answer(SCENE, garbage, check)
        assert 0.0 <= result.score <= 1.0
        if garbage in ("", "   ", None):
            assert not result.correct and not result.hallucinations
    score = judge_description(SCENE, garbage)
    assert 0 <= score.precision <= 1 and 0 <= score.recall <= 1


def test_unknown_check_kind_is_an_error():
    with pytest.raises(ValueError, match="kind"):
        judge_answer(SCENE, "anything", {"kind": "vibes"})


def test_judge_conversation_wants_one_answer_per_checked_turn():
    record = make_task_sample(SCENE, "multi_turn", random.Random(0))
    answers = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
    with pytest.raises(ValueError, match="answers"):
        judge_conversation(SCENE, record, answers[:-1])
    bad = judge_conversation(SCENE, record, ["I see a green star."] + answers[1:])
    assert not bad.correct and bad.hallucinations[0].startswith("turn 1: ")


# ----------------------------------------------------------------------------- description metrics

def test_description_precision_recall_on_hand_made_cases():
    full = judge_description(SCENE, FULL_CAPTION)
    assert (full.precision, full.recall, full.total) == (1.0, 1.0, 14)
    # one object, all four facts right: precision 1, recall 4/14
    one = judge_description(SCENE, "a large red circle at the top left.")
    assert one.precision == 1.0 and one.recall == pytest.approx(4 / 14)
    # the region is wrong: 3 of 4 facts right
    moved = judge_description(SCENE, "a large red circle at the bottom.")
    assert moved.precision == pytest.approx(3 / 4) and moved.recall == pytest.approx(3 / 14)
    # no regions, no word: 9 facts, all right
    listed = judge_description(SCENE, "three shapes: a large red circle, a small red circle "
                                      "and a small blue square.")
    assert listed.precision == 1.0 and listed.recall == pytest.approx(9 / 14)
    # a wrong object: only the region it shares with the large circle is right
    wrong = judge_description(SCENE, "a small green triangle at the top left.")
    assert wrong.precision == pytest.approx(1 / 4)
    # a wrong word: the word and its region are stated, neither right
    word = judge_description(SCENE, 'the word "DOG" is written at the right.')
    assert (word.stated, word.correct) == (2, 0)
    assert judge_description(SCENE, "").precision == 0.0


def test_described_objects_attach_a_region_only_to_the_one_object_of_its_clause():
    from companion.world import described_objects, parse_answer

    parsed = parse_answer("a large red circle at the top left and a square, "
                          "a blue triangle next to a green diamond at the bottom.")
    assert described_objects(parsed) == [
        {"shape": "circle", "size": "large", "color": "red", "region": "top left"},
        {"shape": "square"},
        {"shape": "triangle", "color": "blue"},
        {"shape": "diamond", "color": "green"}]
