"""Captions: phrasings of a scene's full ground truth (contrastive learning, matching,
captioning), and caption pairs that differ from the truth in one fact."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import NamedTuple

from companion.world.phrases import box_text, join_phrases, number_word
from companion.world.scenes import Scene


def scene_captions(scene: Scene) -> list[str]:
    """Five phrasings of the scene's full ground truth; phrasing 0 is the canonical one.

    Lower case except the word; numbers as words; objects in reading order.
    """
    items = [f"a {o.size} {o.color} {o.shape}" for o in scene.objects]
    located = [f"{item} at the {o.region}" for item, o in zip(items, scene.objects)]
    n = len(scene.objects)
    word = f' the word "{scene.word}" is written at the {scene.word_region}.' if scene.word else ""
    captions = [
        join_phrases(located) + ".",
        f"{number_word(n)} shape{'s' if n != 1 else ''}: {join_phrases(items)}.",
        " ".join(f"there is {item}." for item in located),
        join_phrases([f"the {o.region} has {item}" for item, o in zip(items, scene.objects)]) + ".",
        f"a picture of {join_phrases(items)}.",
    ]
    return [caption + word for caption in captions]


def canonical_caption(scene: Scene) -> str:
    """Phrasing 0 of :func:`scene_captions`: the reference answer of a description task."""
    return scene_captions(scene)[0]


def caption_with_boxes(scene: Scene) -> str:
    """The canonical caption with each object's box ("a small red circle at the top left in
    box [0.05, 0.04, 0.19, 0.18]"): the scene in words with everything a grounding answer
    needs, for a text-only LM that is to be told the whole scene."""
    items = [f"a {o.size} {o.color} {o.shape} at the {o.region} in box {box_text(o.bbox)}"
             for o in scene.objects]
    word = f' the word "{scene.word}" is written at the {scene.word_region}.' if scene.word else ""
    return join_phrases(items) + "." + word


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
