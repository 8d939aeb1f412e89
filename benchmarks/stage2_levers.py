"""Section 3.2's instruction-tuned model under other recipes: stage 1 and stage 2 trained
with any ``InstructionRecipe`` options (CLIP and the LM from the cache), then judged on
notebook 3.2's held-out records (its 60 test scenes at seed 3, the same 325 records).

Usage::

    python benchmarks/stage2_levers.py '{"questions_per_conversation": 3}' \\
        '{"stage2_steps": 3200}' --out benchmarks/results/stage2_levers.jsonl

Each argument is one run, a JSON object of ``InstructionRecipe`` fields (``{}``: the
defaults). One JSON line per run: the options, the seconds of both stages (data encoding
included), the held-out mean task accuracy, hallucination rate and each task type.

``--probe`` also measures the vision side as notebooks 3.1.1 and 3.2 do: the recipe's CLIP's
held-out image-to-text R@1 (3.1.1's 300 test scenes), and 3.2's probe (one MLP per cell
trained on the vision tokens of 6,000 scenes, 1,500 steps) against the model's own
descriptions, per cell on 300 held-out scenes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from companion.clip import build_caption_data, evaluate_retrieval, pixel_values_for, \
    pretrained_clip  # noqa: E402
from companion.answers import evaluate_tasks, generate_replies  # noqa: E402
from companion.instruction import InstructionRecipe, instruction_tune  # noqa: E402
from companion.probe import cell_labels, description_cell_accuracy, probe_accuracy, \
    train_probe, vision_tokens  # noqa: E402
from companion.runtime import setup  # noqa: E402
from companion.world import make_instruction_dataset, make_scenes, render_scene  # noqa: E402
from levers_cli import lever_parser, parse_runs, report  # noqa: E402  (this folder)


def main(argv=None) -> int:
    parser = lever_parser(__doc__)
    parser.add_argument("--probe", action="store_true",
                        help="also CLIP's held-out R@1 and 3.2's probe of the vision tokens")
    args = parser.parse_args(argv)
    options = parse_runs(parser, args.runs, lambda kw: InstructionRecipe(**kw),
                         "InstructionRecipe fields")
    test = make_scenes(60, seed=3, start_id=40_000_000)
    by_id = {s.scene_id: s for s in test}
    records = make_instruction_dataset(test, seed=3)
    for kw in options:
        setup(seed=0, device="cpu", threads=args.threads, quiet=True)
        start = time.perf_counter()
        model, processor, tokenizer, _ = instruction_tune(InstructionRecipe(**kw), args.cache_dir)
        seconds = time.perf_counter() - start
        size = model.config.vision_config.image_size
        pixels = pixel_values_for(processor, [render_scene(by_id[r["scene_id"]], size)
                                              for r in records])
        scores = evaluate_tasks(model, tokenizer, records, by_id, pixels, max_new_tokens=48)
        row = {"options": kw, "threads": args.threads, "seconds": round(seconds),
               "mean": round(scores.mean_task_accuracy(), 4),
               "hallucination_rate": round(scores.hallucination_rate(), 4),
               "by_task": {t: round(v["accuracy"], 4) for t, v in scores.by_task().items()}}
        if args.probe:
            row.update(vision_side(InstructionRecipe(**kw), args.cache_dir, model, processor,
                                   tokenizer))
        report(row, args.out)
    return 0


def vision_side(recipe, cache_dir, model, processor, tokenizer) -> dict:
    """CLIP's held-out i2t R@1 (as 3.1.1) and the probe against the descriptions (as 3.2)."""
    clip, clip_processor, clip_tokenizer = pretrained_clip(cache_dir, recipe.clip_recipe(),
                                                           log=None)
    size = model.config.vision_config.image_size
    held = make_scenes(300, seed=recipe.seed + 1, start_id=10_000_000)
    r1 = evaluate_retrieval(clip, build_caption_data(held, clip_tokenizer, clip_processor,
                                                     render_size=size))["i2t_R@1"]

    def tokens(scenes):
        pixels = pixel_values_for(processor, [render_scene(s, size) for s in scenes])
        return vision_tokens(model, pixels), cell_labels(scenes), pixels

    train_tokens, train_labels, _ = tokens(make_scenes(6000, seed=recipe.seed + 4,
                                                       start_id=41_000_000))
    probe_held = make_scenes(300, seed=recipe.seed + 5, start_id=42_000_000)
    held_tokens, held_labels, held_pixels = tokens(probe_held)
    probe = train_probe(train_tokens, train_labels, steps=1500, seed=recipe.seed).probe
    read = probe_accuracy(probe, held_tokens, held_labels)
    describe = [{"from": "human", "value": "<image>\nDescribe the image."}]
    said = description_cell_accuracy(probe_held, generate_replies(
        model, tokenizer, [describe] * len(probe_held), held_pixels, max_new_tokens=48))
    return {"clip_i2t_R@1": round(r1, 4),
            "probe": {k: round(float(v), 4) for k, v in read.items()},
            "descriptions": {k: round(float(v), 4) for k, v in said.items()}}


if __name__ == "__main__":
    raise SystemExit(main())
