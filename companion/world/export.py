"""A world data set on disk in LLaVA's layout (images, data.json) with its ground truth
(scenes.json), and back."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from companion.data.llava import load_llava_json, save_llava_json
from companion.world.render import scene_png_bytes
from companion.world.scenes import Scene


SCENES_FORMAT = "companion-shapes-world"


def export_llava_dataset(scenes: Sequence[Scene], records: Sequence[dict], out_dir,
                         image_size: int = 64, background=None) -> Path:
    """Write a world data set in LLaVA's layout and return its folder.

    ``out_dir/images/scene_XXXXXX.png`` (deterministic PNG bytes), ``out_dir/data.json``
    (the records, validated, images checked) and ``out_dir/scenes.json`` (the ground truth,
    so the judge can run on the loaded data).
    """
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
