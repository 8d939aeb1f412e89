"""The world's vocabulary and its scenes: one to four shapes on a 3 × 3 grid and
perhaps a word, each scene sampled from its own seeded random stream."""

from __future__ import annotations

import random
from dataclasses import dataclass


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
