"""Section 3.2's instruction-tuned model under other recipes: stage 1 and stage 2 trained
with any ``InstructionRecipe`` options (CLIP and the LM from the cache), then judged on
notebook 3.2's held-out records (its 60 test scenes at seed 3, the same 325 records).

Usage::

    python benchmarks/stage2_levers.py '{"questions_per_conversation": 3}' \\
        '{"stage2_steps": 3200}' --out benchmarks/results/stage2_levers.jsonl

Each argument is one run, a JSON object of ``InstructionRecipe`` fields (``{}``: the
defaults). One JSON line per run: the options, the seconds of both stages (data encoding
included), the held-out mean task accuracy, hallucination rate and each task type.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from companion.clip import pixel_values_for  # noqa: E402
from companion.instruction import InstructionRecipe, evaluate_tasks, instruction_tune  # noqa: E402
from companion.runtime import setup  # noqa: E402
from companion.world import make_instruction_dataset, make_scenes, render_scene  # noqa: E402
from levers_cli import lever_parser, parse_runs, report  # noqa: E402  (this folder)


def main(argv=None) -> int:
    parser = lever_parser(__doc__)
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
        report(row, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
