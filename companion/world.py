"""The shapes world: seeded scenes, their pictures, captions, instruction data and a judge.

A scene is a 3×3 grid holding one to four coloured shapes (at most one per cell) and,
sometimes, a short word written in a free cell. Every scene carries its ground truth, so
everything the chapter needs follows from it exactly:

- ``render_scene``: the picture (Pillow, deterministic bytes);
- ``scene_captions``: several phrasings of the full ground truth (contrastive learning,
  matching, captioning);
- ``make_task_sample``: LLaVA-style records for the six task types of the seed's table
  (description 图像描述, counting VQA 视觉问答, OCR, reasoning 推理, multi-turn 对话,
  grounding 定位), each assistant turn with a *check* saying what a correct answer contains;
- ``judge_answer``: parses a free-text answer, decides whether it passes the check and lists
  hallucinations (objects, colours, counts or words that are not in the scene).

The vocabulary is small and closed and the answers are templates, so a ~1M-parameter model
trained for minutes on a CPU can learn them.
"""

from __future__ import annotations

import functools
import io
import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from companion.tokenizer import IMAGE_TOKEN

# ----------------------------------------------------------------------------- vocabulary

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {  # name -> RGB, far apart in hue so a 32-pixel image still tells them apart
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 80, 220),
    "yellow": (235, 200, 0),
    "purple": (140, 50, 180),
    "orange": (245, 125, 0),
}
SIZES = ("small", "large")
REGIONS = ("top left", "top", "top right",
           "left", "center", "right",
           "bottom left", "bottom", "bottom right")  # cell index = 3 * row + column
WORDS = ("CAT", "DOG", "SUN", "BOX", "MAP", "KEY", "CUP", "HAT", "BUS", "PEN", "FOX", "ICE")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TASK_TYPES = ("description", "counting", "ocr", "reasoning", "multi_turn", "grounding")
ANSWER_STYLES = ("verdict_first", "evidence_first")
CHECK_KINDS = ("describe", "count", "ocr", "compare", "remove", "largest", "smallest",
               "ground", "identify", "color", "shape", "size")

DEFAULT_BACKGROUND = (240, 240, 240)
TEXT_COLOR = (0, 0, 0)
SUPERSAMPLE = 4  # shapes are drawn at 4× and box-filtered down: smooth edges, same bytes
LARGE_FRACTION = (0.76, 0.90)  # side of a large object, as a fraction of its cell
SMALL_FRACTION = (0.44, 0.54)
CELL_MARGIN = 0.03  # fraction of the cell kept free on each side


def image_path(scene_id: int) -> str:
    """The image path of a scene inside an exported data set (relative to its folder)."""
    return f"images/scene_{scene_id:06d}.png"


# ----------------------------------------------------------------------------- scenes

@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene; ``bbox`` is (x0, y0, x1, y1) in [0, 1], rounded to 3 decimals."""

    shape: str
    color: str
    size: str
    region: str
    bbox: tuple[float, float, float, float]

    def __post_init__(self):
        for name, value, allowed in (("shape", self.shape, SHAPES), ("color", self.color, COLORS),
                                     ("size", self.size, SIZES), ("region", self.region, REGIONS)):
            if value not in allowed:
                raise ValueError(f"SceneObject {name}={value!r} is not one of {tuple(allowed)}")
        bbox = tuple(float(v) for v in self.bbox)
        if len(bbox) != 4:
            raise ValueError(f"SceneObject bbox must be (x0, y0, x1, y1), got {self.bbox!r}")
        object.__setattr__(self, "bbox", bbox)

    @property
    def attributes(self) -> dict:
        """``{"size", "color", "shape"}``: what a phrase like "a large red circle" names."""
        return {"size": self.size, "color": self.color, "shape": self.shape}

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size,
                "region": self.region, "bbox": list(self.bbox)}

    @classmethod
    def from_dict(cls, data: dict) -> SceneObject:
        return cls(shape=data["shape"], color=data["color"], size=data["size"],
                   region=data["region"], bbox=tuple(data["bbox"]))


@dataclass(frozen=True)
class Scene:
    """A scene's ground truth: objects in reading order of their cells, an optional word."""

    scene_id: int
    objects: tuple[SceneObject, ...]
    word: str | None = None
    word_region: str | None = None

    def __post_init__(self):
        objects = tuple(sorted(self.objects, key=lambda o: REGIONS.index(o.region)))
        regions = [o.region for o in objects]
        if len(set(regions)) != len(regions):
            raise ValueError(f"scene {self.scene_id}: two objects share a cell ({regions})")
        if (self.word is None) != (self.word_region is None):
            raise ValueError(f"scene {self.scene_id}: word and word_region go together, got "
                             f"word={self.word!r}, word_region={self.word_region!r}")
        if self.word_region is not None and (self.word_region not in REGIONS
                                             or self.word_region in regions):
            raise ValueError(f"scene {self.scene_id}: word_region={self.word_region!r} must be a "
                             "free cell")
        object.__setattr__(self, "objects", objects)

    @property
    def image(self) -> str:
        return image_path(self.scene_id)

    def to_dict(self) -> dict:
        return {"scene_id": self.scene_id, "objects": [o.to_dict() for o in self.objects],
                "word": self.word, "word_region": self.word_region}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        return cls(scene_id=int(data["scene_id"]),
                   objects=tuple(SceneObject.from_dict(o) for o in data["objects"]),
                   word=data.get("word"), word_region=data.get("word_region"))


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are sampled and drawn."""

    image_size: int = 64           # pixels per side when rendered
    min_objects: int = 1           # objects per scene, inclusive range
    max_objects: int = 4
    word_probability: float = 0.3  # chance that a scene has a word (for OCR)
    background: tuple[int, int, int] = DEFAULT_BACKGROUND
    seed: int = 0

    def __post_init__(self):
        if self.min_objects < 1:
            raise ValueError(f"WorldConfig.min_objects={self.min_objects}; a scene needs at "
                             "least 1 object")
        if self.max_objects > 8:
            raise ValueError(f"WorldConfig.max_objects={self.max_objects}; at most 8 objects fit "
                             "(9 cells, one kept free for a word)")
        if self.min_objects > self.max_objects:
            raise ValueError(f"WorldConfig.min_objects={self.min_objects} exceeds "
                             f"max_objects={self.max_objects}")
        if self.image_size < 16:
            raise ValueError(f"WorldConfig.image_size={self.image_size}; use at least 16 pixels")
        if not 0.0 <= self.word_probability <= 1.0:
            raise ValueError(f"WorldConfig.word_probability={self.word_probability} must be "
                             "in [0, 1]")
        if len(self.background) != 3 or not all(0 <= int(c) <= 255 for c in self.background):
            raise ValueError(f"WorldConfig.background={self.background!r} must be an RGB "
                             "triple of 0..255")


def _sample_bbox(rng: random.Random, cell: int, size: str) -> tuple[float, float, float, float]:
    """A square box inside ``cell``, its side a random fraction of the cell, jittered."""
    side_cell = 1.0 / 3.0
    low, high = LARGE_FRACTION if size == "large" else SMALL_FRACTION
    side = rng.uniform(low, high) * side_cell
    margin = CELL_MARGIN * side_cell
    slack = side_cell - side - 2 * margin  # room left for jitter
    row, column = divmod(cell, 3)
    x0 = column * side_cell + margin + rng.random() * slack
    y0 = row * side_cell + margin + rng.random() * slack
    return (round(x0, 3), round(y0, 3), round(x0 + side, 3), round(y0 + side, 3))


def _sample_scene(scene_id: int, seed: int, config: WorldConfig) -> Scene:
    rng = random.Random(f"shapes-world:{seed}:{scene_id}")  # a stream per scene
    n = rng.randint(config.min_objects, config.max_objects)
    cells = sorted(rng.sample(range(9), n))
    objects = []
    for cell in cells:
        shape, color, size = rng.choice(SHAPES), rng.choice(tuple(COLORS)), rng.choice(SIZES)
        bbox = _sample_bbox(rng, cell, size)
        objects.append(SceneObject(shape, color, size, REGIONS[cell], bbox))
    word = word_region = None
    if rng.random() < config.word_probability:
        word = rng.choice(WORDS)
        word_region = REGIONS[rng.choice([c for c in range(9) if c not in cells])]
    return Scene(scene_id, tuple(objects), word, word_region)


def make_scenes(n: int, seed: int | None = None, config: WorldConfig | None = None,
                start_id: int = 0) -> list[Scene]:
    """``n`` scenes with ids ``start_id ..``; the same seed gives the same scenes.

    Each scene has its own random stream keyed by (seed, scene id), so scene 7 is the same
    whether 10 or 1000 scenes are made. ``seed`` defaults to ``config.seed`` (0).
    """
    config = config if config is not None else WorldConfig()
    seed = config.seed if seed is None else seed
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"make_scenes needs a number of scenes n >= 0, got {n!r}")
    return [_sample_scene(start_id + i, seed, config) for i in range(n)]


# ----------------------------------------------------------------------------- rendering

@functools.lru_cache(maxsize=16)
def _font(pixels: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=pixels)  # Pillow ≥ 10.1 with FreeType: scalable
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()  # the fixed bitmap font


def render_scene(scene: Scene, image_size: int = 64, background=None):
    """Draw ``scene`` as an RGB ``PIL.Image`` of ``image_size`` × ``image_size`` pixels.

    Shapes are filled; the word is black, centred in its cell. Drawing happens at 4× the
    size and is reduced with a box filter, so edges are smooth and bytes deterministic.
    """
    from PIL import Image, ImageDraw

    if image_size < 8:
        raise ValueError(f"image_size={image_size} is too small to draw a scene")
    canvas = image_size * SUPERSAMPLE
    image = Image.new("RGB", (canvas, canvas), tuple(background or DEFAULT_BACKGROUND))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = (v * canvas for v in obj.bbox)
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
        else:  # diamond
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    if scene.word:
        row, column = divmod(REGIONS.index(scene.word_region), 3)
        cell = canvas / 3
        font = _font(max(8, round(cell * 0.40)))
        draw.text(((column + 0.5) * cell, (row + 0.5) * cell), scene.word, fill=TEXT_COLOR,
                  font=font, anchor="mm", stroke_width=max(1, SUPERSAMPLE // 3),
                  stroke_fill=TEXT_COLOR)
    return image.reduce(SUPERSAMPLE)


def scene_png_bytes(scene: Scene, image_size: int = 64, background=None) -> bytes:
    """The scene's PNG file: no metadata, no timestamp, so the bytes depend on the scene only."""
    buffer = io.BytesIO()
    render_scene(scene, image_size, background).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- text helpers

def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def _noun(target: dict, plural: bool) -> str:
    """"large red circle(s)", "red object(s)", "object(s)" for a target of attributes."""
    words = [target[k] for k in ("size", "color") if target.get(k)]
    head = target.get("shape") or "object"
    return " ".join(words + [head + ("s" if plural else "")])


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def count_phrase(n: int, target: dict) -> str:
    """"no red objects", "one circle", "two large squares"."""
    return f"{'no' if n == 0 else number_word(n)} {_noun(target, plural=n != 1)}"


def _there_is(n: int, target: dict) -> str:
    return f"there {'is' if n == 1 else 'are'} {count_phrase(n, target)}"


def _join(parts: Sequence[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    if len(parts) <= 2:
        return " and ".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _box_text(bbox: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in bbox) + "]"


def _matches(obj: SceneObject, target: dict) -> bool:
    return all(getattr(obj, key) == value for key, value in target.items() if value is not None)


def count_objects(scene: Scene, target: dict) -> int:
    """Number of objects whose attributes match ``target`` (e.g. ``{"color": "red"}``)."""
    return sum(_matches(o, target) for o in scene.objects)


def reference(scene: Scene, obj: SceneObject) -> dict | None:
    """The shortest unambiguous name of ``obj``: {color, shape}, else {size, color, shape}."""
    for keys in (("color", "shape"), ("size", "color", "shape")):
        target = {k: getattr(obj, k) for k in keys}
        if count_objects(scene, target) == 1:
            return target
    return None


# ----------------------------------------------------------------------------- captions

def scene_captions(scene: Scene) -> list[str]:
    """Five phrasings of the scene's full ground truth; phrasing 0 is the canonical one.

    Lower case except the word; numbers as words; objects in reading order.
    """
    items = [f"a {o.size} {o.color} {o.shape}" for o in scene.objects]
    located = [f"{item} at the {o.region}" for item, o in zip(items, scene.objects)]
    n = len(scene.objects)
    word = f' the word "{scene.word}" is written at the {scene.word_region}.' if scene.word else ""
    captions = [
        _join(located) + ".",
        f"{number_word(n)} shape{'s' if n != 1 else ''}: {_join(items)}.",
        " ".join(f"there is {item}." for item in located),
        _join([f"the {o.region} has {item}" for item, o in zip(items, scene.objects)]) + ".",
        f"a picture of {_join(items)}.",
    ]
    return [caption + word for caption in captions]


def canonical_caption(scene: Scene) -> str:
    """Phrasing 0 of :func:`scene_captions`: the reference answer of a description task."""
    return scene_captions(scene)[0]


def caption_with_boxes(scene: Scene) -> str:
    """The canonical caption with each object's box ("a small red circle at the top left in
    box [0.05, 0.04, 0.19, 0.18]"): the scene in words with everything a grounding answer
    needs, for a text-only LM that is to be told the whole scene."""
    items = [f"a {o.size} {o.color} {o.shape} at the {o.region} in box {_box_text(o.bbox)}"
             for o in scene.objects]
    word = f' the word "{scene.word}" is written at the {scene.word_region}.' if scene.word else ""
    return _join(items) + "." + word


class CaptionPair(NamedTuple):
    image_index: int  # position of the scene in the list given
    caption: str
    caption_id: int   # which phrasing of scene_captions


def make_caption_pairs(scenes: Sequence[Scene], seed: int = 0,
                       per_scene: int = 1) -> list[CaptionPair]:
    """Image-caption pairs for contrastive learning: ``per_scene`` distinct random phrasings
    of each scene (deterministic in ``seed``)."""
    pairs = []
    for index, scene in enumerate(scenes):
        captions = scene_captions(scene)
        if not 1 <= per_scene <= len(captions):
            raise ValueError(f"per_scene={per_scene}; each scene has {len(captions)} phrasings")
        rng = random.Random(f"captions:{seed}:{scene.scene_id}")
        for caption_id in sorted(rng.sample(range(len(captions)), per_scene)):
            pairs.append(CaptionPair(index, captions[caption_id], caption_id))
    return pairs


# ----------------------------------------------------------------------------- instruction tasks
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
        question = rng.choice(COUNT_QUESTIONS).format(_noun(target, plural=True))
    n = count_objects(scene, target)
    answer = _capital(_there_is(n, target)) + "."
    return question, answer, {"kind": "count", "target": target, "value": n}


def _ocr_qa(scene, rng):
    question = rng.choice(OCR_QUESTIONS)
    answer = f'The word is "{scene.word}".' if scene.word else "There is no word in the image."
    return question, answer, {"kind": "ocr", "value": scene.word}


def _ground_answer(obj: SceneObject, subject: str) -> str:
    return f"{subject} is at the {obj.region}, in box {_box_text(obj.bbox)}."


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
    name = _noun(target, plural=False)
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
    question = rng.choice(COMPARE_QUESTIONS).format(_noun(ta, True), _noun(tb, True))
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
        return f"{_capital(evidence)}, so {check['value']}."
    return f"{_capital(check['value'])}, {evidence}."


def _remove_qa(scene, rng, named):
    obj, target = rng.choice(named)
    remain = len(scene.objects) - 1
    question = rng.choice(REMOVE_QUESTIONS).format(_noun(target, False))
    answer = f"{_capital('no' if remain == 0 else number_word(remain))} " \
             f"object{'s' if remain != 1 else ''} would remain."
    return question, answer, {"kind": "remove", "removed": _object_dict(obj), "value": remain}


def _superlative_qa(scene, rng, kind):
    """Which object is the largest / smallest? Asked only when exactly one object is."""
    size = "large" if kind == "largest" else "small"
    obj = next(o for o in scene.objects if o.size == size)
    target = {"color": obj.color, "shape": obj.shape}
    question = rng.choice(SUPERLATIVE_QUESTIONS).format(kind)
    answer = f"The {kind} object is the {_noun(target, False)}."
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


def _check_tasks(tasks: Sequence[str]) -> None:
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
    _check_tasks(tasks)
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


# ----------------------------------------------------------------------------- a careless annotator

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
        return _join(parts) + rest + "."
    if kind == "count" and check["value"] > 0:  # a guessed count
        wrong = check["value"] + rng.choice((1, 2))
        return _capital(_there_is(wrong, check["target"])) + "."
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
    _check_tasks(tasks)
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


# ----------------------------------------------------------------------------- answer parser

_NUMBERS = {w: i for i, w in enumerate(NUMBER_WORDS)} | {"no": 0, "none": 0, "ten": 10,
                                                          "eleven": 11, "twelve": 12}
_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small",
               "large": "large", "big": "large"}
_FOREIGN_COLORS = ("pink", "brown", "cyan", "magenta", "violet", "indigo", "turquoise",
                   "gold", "silver")
_FOREIGN_SHAPES = ("star", "hexagon", "pentagon", "rectangle", "oval", "heart", "ellipse",
                   "arrow", "cube", "sphere", "cross", "moon", "octagon", "ring", "cylinder")
_GENERIC_HEADS = ("object", "shape", "thing", "item")
_ARTICLES = ("a", "an", "the", "any", "another")
_NEGATIONS = ("not", "no", "nor", "never")
_CLAUSE_WORDS = ("and", "while", "but")
_REGION_WORDS = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom",
                 "left": "left", "right": "right", "center": "center", "centre": "center",
                 "middle": "center"}
_NUMBER = r"-?\d*\.?\d+"
_TOKEN = re.compile(
    r"(?P<box>\[\s*{n}\s*,\s*{n}\s*,\s*{n}\s*,\s*{n}\s*\])".format(n=_NUMBER)
    + r'|(?P<quote>["“”]\s*(?P<quoted>[^"“”\n]{0,40}?)\s*["“”])'
    + r"|(?P<number>\d+(?:\.\d+)?)|(?P<word>[A-Za-z]+)|(?P<punct>[.,;:!?])")


def _head(word: str) -> tuple[str, str] | None:
    """("shape"|"foreign"|"generic", singular) for a noun that names an object, else None."""
    singular = word[:-2] if word.endswith("es") and word[:-2] in _FOREIGN_SHAPES else \
        word[:-1] if word.endswith("s") else word
    for kind, names in (("shape", SHAPES), ("foreign", _FOREIGN_SHAPES),
                        ("generic", _GENERIC_HEADS)):
        if word in names or singular in names:
            return kind, (word if word in names else singular)
    return None


def _tokens(answer: str) -> list[dict]:
    """Tokens of an answer: words (lower-cased, raw kept), numbers, quoted words, boxes and
    punctuation."""
    text = re.sub(r"n['’]t\b", " not", answer)
    tokens = []
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup if match.lastgroup != "quoted" else "quote"
        if kind == "box":
            values = [float(v) for v in re.findall(_NUMBER, match.group("box"))]
            tokens.append({"kind": "box", "value": values})
        elif kind == "quote":
            tokens.append({"kind": "quote", "value": match.group("quoted").strip()})
        elif kind == "word":
            tokens.append({"kind": "word", "value": match.group().lower(), "raw": match.group()})
        elif kind == "number":
            tokens.append({"kind": "number", "value": match.group()})
        else:
            tokens.append({"kind": "punct", "value": match.group()})
    return tokens


def _number_value(token: dict) -> int | None:
    if token["kind"] == "number":
        value = float(token["value"])
        return int(value) if value.is_integer() else None
    if token["kind"] == "word":
        return _NUMBERS.get(token["value"])
    return None


def _word(tokens, i) -> str | None:
    return tokens[i]["value"] if 0 <= i < len(tokens) and tokens[i]["kind"] == "word" else None


def _parse_phrase(tokens, i) -> dict | None:
    """A noun phrase at ``i``: [number] [article] (size | colour)* head-noun."""
    j, number = i, None
    if j < len(tokens) and _number_value(tokens[j]) is not None:
        number, j = _number_value(tokens[j]), j + 1
    if number is None and _word(tokens, j) in _ARTICLES:
        j += 1
    phrase = {"number": number, "size": None, "color": None, "foreign_color": None}
    while True:
        word = _word(tokens, j)
        if word in _SIZE_WORDS:
            phrase["size"] = _SIZE_WORDS[word]
        elif word in COLORS:
            phrase["color"] = word
        elif word in _FOREIGN_COLORS:
            phrase["foreign_color"] = word
        else:
            break
        j += 1
    word = _word(tokens, j)
    head = _head(word) if word else None
    if head is None:
        return None
    kind, noun = head
    phrase.update(shape=noun if kind == "shape" else None,
                  foreign_shape=noun if kind == "foreign" else None,
                  plural=word != noun, start=i, end=j + 1)
    before = _word(tokens, i - 1)
    phrase["negated"] = number is None and before in _NEGATIONS
    if phrase["negated"]:
        phrase["number"] = 0
    return phrase


def parse_answer(answer) -> dict:
    """What a free-text answer states, JSON-able.

    ``phrases``: noun phrases ("two red circles", "a large square", "no triangles"), each
    with number (None if not stated), size, color, shape (None for object/shape), foreign
    colour/shape words (not of this world), negated; ``colors``/``sizes``/``shapes``: all
    such words; ``regions``; ``numbers``: bare numbers outside phrases; ``words``: quoted
    words (else all-caps words); ``boxes``; ``yes_no``; ``no_word`` ("there is no word");
    ``clauses``: token spans split at punctuation and "and", for attaching regions.
    """
    if not isinstance(answer, str):
        answer = "" if answer is None else str(answer)
    tokens = _tokens(answer[:4000])
    parsed = {"phrases": [], "colors": [], "sizes": [], "shapes": [], "regions": [],
              "numbers": [], "words": [], "boxes": [], "yes_no": None, "no_word": False,
              "standalone_colors": []}
    clause, i = 0, 0
    while i < len(tokens):
        token = tokens[i]
        word = token["value"] if token["kind"] == "word" else None
        if token["kind"] == "punct" or word in _CLAUSE_WORDS:
            clause += 1
            i += 1
            continue
        phrase = _parse_phrase(tokens, i)
        if phrase is not None:
            phrase["clause"] = clause
            parsed["phrases"].append(phrase)
            i = phrase["end"]
            continue
        if token["kind"] == "box":
            parsed["boxes"].append(token["value"])
        elif token["kind"] == "quote":
            if token["value"]:
                parsed["words"].append({"word": token["value"], "clause": clause, "quoted": True})
        elif word in _REGION_WORDS:
            region, second = _REGION_WORDS[word], _REGION_WORDS.get(_word(tokens, i + 1) or "")
            if region in ("top", "bottom") and second in ("left", "right"):
                region, i = f"{region} {second}", i + 1  # "top left": one region, two words
            parsed["regions"].append({"region": region, "clause": clause})
        elif word in COLORS or word in _FOREIGN_COLORS:
            parsed["colors"].append(word)
            parsed["standalone_colors"].append(word)  # "the square is blue"
        elif word in _SIZE_WORDS:
            parsed["sizes"].append(_SIZE_WORDS[word])
        elif word in ("yes", "no") and parsed["yes_no"] is None and (
                i == 0 or i + 1 == len(tokens) or tokens[i + 1]["kind"] == "punct"):
            parsed["yes_no"] = word
        elif _number_value(token) is not None:
            parsed["numbers"].append(_number_value(token))
        elif token["kind"] == "word" and len(token["raw"]) >= 2 and token["raw"].isupper():
            parsed["words"].append({"word": token["raw"], "clause": clause, "quoted": False})
        i += 1
    for phrase in parsed["phrases"]:
        if phrase["negated"] or phrase["number"] == 0:
            continue
        if phrase["color"] or phrase["foreign_color"]:
            parsed["colors"].append(phrase["color"] or phrase["foreign_color"])
        if phrase["size"]:
            parsed["sizes"].append(phrase["size"])
        if phrase["shape"] or phrase["foreign_shape"]:
            parsed["shapes"].append(phrase["shape"] or phrase["foreign_shape"])
    lowered = " " + re.sub(r"n['’]t\b", " not", answer[:4000].lower()) + " "
    parsed["no_word"] = bool(re.search(r"\b(no|not any|not a|without any|without a)\s+"
                                       r"(word|words|text|writing)\b", lowered)
                             or re.search(r"\bnothing (is )?written\b", lowered))
    return parsed


# ----------------------------------------------------------------------------- judge

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
                found.append(f"mentions {_article(text)}, which is not in the scene")
            continue
        target = _phrase_target(phrase)
        if phrase["number"] is not None:
            truth = count_objects(count_scene, target)
            if truth != phrase["number"]:
                there = "there is one" if truth == 1 else f"there are {number_word(truth)}" \
                    if truth else "there are none"
                found.append(f"claims {count_phrase(phrase['number'], target)}, but {there}")
        elif target and count_objects(scene, target) == 0:
            found.append(f"mentions {_article(text)}, which is not in the scene")
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
        gone = next((o for o in scene.objects if _matches(o, removed)), None)
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


# ----------------------------------------------------------------------------- export / load

SCENES_FORMAT = "companion-shapes-world"


def export_llava_dataset(scenes: Sequence[Scene], records: Sequence[dict], out_dir,
                         image_size: int = 64, background=None) -> Path:
    """Write a world data set in LLaVA's layout and return its folder.

    ``out_dir/images/scene_XXXXXX.png`` (deterministic PNG bytes), ``out_dir/data.json``
    (the records, validated, images checked) and ``out_dir/scenes.json`` (the ground truth,
    so the judge can run on the loaded data).
    """
    from companion.data.llava import save_llava_json

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for scene in scenes:
        (out / scene.image).write_bytes(scene_png_bytes(scene, image_size, background))
    truth = {"format": SCENES_FORMAT, "version": 1, "image_size": image_size,
             "scenes": [s.to_dict() for s in scenes]}
    temporary = out / ".scenes.json.tmp"
    temporary.write_text(json.dumps(truth, indent=1) + "\n", encoding="utf-8")
    temporary.replace(out / "scenes.json")
    save_llava_json(list(records), out / "data.json", image_folder=out, check_images=True)
    return out


def load_world_dataset(out_dir) -> tuple[list[dict], list[Scene]]:
    """Load what :func:`export_llava_dataset` wrote: ``(records, scenes)``, validated."""
    from companion.data.llava import load_llava_json

    out = Path(out_dir)
    records = load_llava_json(out / "data.json", image_folder=out, check_images=True)
    path = out / "scenes.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a world data set keeps its ground truth "
                                "there; write it with export_llava_dataset")
    truth = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(truth, dict) or truth.get("format") != SCENES_FORMAT:
        raise ValueError(f"{path} is not a shapes-world scenes file (expected \"format\": "
                         f"\"{SCENES_FORMAT}\")")
    return records, [Scene.from_dict(s) for s in truth["scenes"]]
