"""The shapes world: seeded scenes, their pictures, captions, instruction data and a judge.

A scene is a 3×3 grid holding one to four coloured shapes (at most one per cell) and,
sometimes, a short word written in a free cell. Every scene carries its ground truth, so
everything the chapter needs follows from it exactly. One module per job:

- ``scenes``: the vocabulary (shapes, colours, sizes, regions, words) and ``make_scenes``;
- ``render``: ``render_scene``, the picture (Pillow, deterministic bytes);
- ``phrases``: the English the other modules share (number words, noun phrases, counts);
- ``captions``: ``scene_captions``, several phrasings of the full ground truth
  (contrastive learning, matching, captioning), and one-fact-changed caption pairs;
- ``tasks``: ``make_task_sample``, LLaVA-style records for the six task types of the
  seed's table (description 图像描述, counting VQA 视觉问答, OCR, reasoning 推理, multi-turn
  对话, grounding 定位), each assistant turn with a *check* saying what a correct answer
  contains;
- ``annotator``: ``careless_annotations``, machine-written data that invents things;
- ``parser`` and ``judge``: ``judge_answer`` parses a free-text answer, decides whether it
  passes the check and lists hallucinations (objects, colours, counts or words that are not
  in the scene);
- ``export``: a world data set on disk in LLaVA's layout, with its ground truth.

The vocabulary is small and closed and the answers are templates, so a ~1M-parameter model
trained for minutes on a CPU can learn them. Every public name is importable from
``companion.world`` itself, as before the split.
"""

from __future__ import annotations

# vocabulary, objects, scenes
from companion.world.scenes import (ANSWER_STYLES, CELL_MARGIN, CHECK_KINDS, COLORS,
                                    DEFAULT_BACKGROUND, LARGE_FRACTION, NUMBER_WORDS, REGIONS,
                                    SHAPES, SIZES, SMALL_FRACTION, SUPERSAMPLE, TASK_TYPES,
                                    TEXT_COLOR, WORDS, Scene, SceneObject, WorldConfig, image_path,
                                    make_scenes)
# pictures
from companion.world.render import render_scene, scene_png_bytes
# text helpers
from companion.world.phrases import count_objects, count_phrase, number_word, reference
# captions
from companion.world.captions import (CaptionPair, canonical_caption, caption_with_boxes,
                                      make_caption_pairs, scene_captions)
# instruction records
from companion.world.tasks import (COMPARE_QUESTIONS, COUNT_QUESTIONS, DESCRIBE_QUESTIONS,
                                   GROUND_QUESTIONS, OCR_QUESTIONS, REMOVE_QUESTIONS,
                                   SUPERLATIVE_QUESTIONS, TOTAL_QUESTIONS, make_instruction_dataset,
                                   make_task_sample, merge_records)
# machine-written data
from companion.world.annotator import LONG_FORM_TASKS, careless_annotations
# reading an answer
from companion.world.parser import parse_answer
# judging it
from companion.world.judge import (ConversationResult, DescriptionScore, JudgeResult,
                                   described_objects, judge_answer, judge_conversation,
                                   judge_description)
# files
from companion.world.export import SCENES_FORMAT, export_llava_dataset, load_world_dataset

__all__ = [
    "ANSWER_STYLES",
    "CELL_MARGIN",
    "CHECK_KINDS",
    "COLORS",
    "DEFAULT_BACKGROUND",
    "LARGE_FRACTION",
    "NUMBER_WORDS",
    "REGIONS",
    "SHAPES",
    "SIZES",
    "SMALL_FRACTION",
    "SUPERSAMPLE",
    "TASK_TYPES",
    "TEXT_COLOR",
    "WORDS",
    "Scene",
    "SceneObject",
    "WorldConfig",
    "image_path",
    "make_scenes",
    "render_scene",
    "scene_png_bytes",
    "count_objects",
    "count_phrase",
    "number_word",
    "reference",
    "CaptionPair",
    "canonical_caption",
    "caption_with_boxes",
    "make_caption_pairs",
    "scene_captions",
    "COMPARE_QUESTIONS",
    "COUNT_QUESTIONS",
    "DESCRIBE_QUESTIONS",
    "GROUND_QUESTIONS",
    "OCR_QUESTIONS",
    "REMOVE_QUESTIONS",
    "SUPERLATIVE_QUESTIONS",
    "TOTAL_QUESTIONS",
    "make_instruction_dataset",
    "make_task_sample",
    "merge_records",
    "LONG_FORM_TASKS",
    "careless_annotations",
    "parse_answer",
    "ConversationResult",
    "DescriptionScore",
    "JudgeResult",
    "described_objects",
    "judge_answer",
    "judge_conversation",
    "judge_description",
    "SCENES_FORMAT",
    "export_llava_dataset",
    "load_world_dataset",
]
