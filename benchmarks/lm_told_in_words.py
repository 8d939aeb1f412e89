"""How well the text-only LM answers when told each held-out scene in words, against its
training compute: the ceiling a VLM built on it cannot pass (3.2's "text LM" column).

Usage::

    python benchmarks/lm_told_in_words.py NAME [KEY=VALUE ...] --evals 500,1000 \\
        --out benchmarks/results/lm_told_in_words.jsonl

KEY=VALUE sets a field of ``companion.vlm.LMRecipe`` (``steps``, ``scenes``, ``lr``,
``batch_size``, ``loss_on``, ``questions_per_conversation``, ``answer_style``,
``max_length``) or of its ``TinyLMConfig`` (``hidden_size``, ``layers``, ``heads``,
``intermediate_size``). The LM is measured at every step in ``--evals`` and at the end, on
the held-out scenes of notebook 3.2 (its ``test_scenes`` at seed 3, the same records) and
on as many of its own training scenes (does it underfit or overfit?), by the world's judge.
One JSON line per run: the recipe, the curve (step, tokens seen, seconds, mean task
accuracy held out and on training scenes, the mean over the five task types without
grounding, whose words carry no boxes, and each type).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from companion.answers import evaluate_tasks  # noqa: E402
from companion.runtime import setup  # noqa: E402
from companion.tokenizer import world_tokenizer  # noqa: E402
from companion.lm import (LMRecipe, TinyLMConfig, lm_training_examples,  # noqa: E402
                          pretrain_lm, told_in_words)
from companion.world import make_scenes  # noqa: E402


def _told_in_words(scenes, seed, max_new_tokens, boxes=False):
    text, by_id = told_in_words(scenes, seed, boxes)
    return lambda model, tok: evaluate_tasks(model, tok, text, by_id, None,
                                             max_new_tokens=max_new_tokens)


def _row(scores) -> dict:
    by_task = {t: round(v["accuracy"], 4) for t, v in scores.by_task().items()}
    five = [v for t, v in by_task.items() if t != "grounding"]
    return {"mean": round(scores.mean_task_accuracy(), 4),
            "mean_without_grounding": round(sum(five) / len(five), 4), "by_task": by_task}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("settings", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--evals", default="", help="steps to measure at, comma-separated")
    parser.add_argument("--test-scenes", type=int, default=150)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--show-wrong", type=int, default=2,
                        help="wrong held-out answers printed per task type at the end")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache"))
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    recipe, sizes = LMRecipe(), TinyLMConfig()
    recipe_fields = {f.name: f.type for f in fields(LMRecipe)}
    for item in args.settings:
        key, _, value = item.partition("=")
        target = sizes if key in TinyLMConfig.__dataclass_fields__ else recipe
        if key not in recipe_fields and target is recipe:
            parser.error(f"{key!r} is not a field of LMRecipe or TinyLMConfig")
        current = getattr(target, key)
        converted = (value in ("1", "true", "True")) if isinstance(current, bool) \
            else type(current)(value)
        if target is sizes:
            sizes = replace(sizes, **{key: converted})
        else:
            recipe = replace(recipe, **{key: converted})
    recipe = replace(recipe, sizes=sizes)
    setup(seed=recipe.seed, device="cpu", threads=args.threads)
    tokenizer = world_tokenizer(args.cache_dir, n_scenes=recipe.tokenizer_scenes, log=None)
    heldout = _told_in_words(make_scenes(args.test_scenes, seed=3, start_id=40_000_000), 3,
                             args.max_new_tokens, recipe.scene_boxes)
    own = _told_in_words(make_scenes(args.test_scenes, seed=recipe.seed, start_id=20_000_000),
                         recipe.seed, args.max_new_tokens, recipe.scene_boxes)
    examples = lm_training_examples(recipe, tokenizer)
    tokens_per_step = recipe.batch_size * sum(len(e["input_ids"]) for e in examples) / len(examples)
    evals = {int(s) for s in args.evals.split(",") if s} | {recipe.steps}
    curve, start, measuring = [], time.perf_counter(), [0.0]

    def measure(step, model):
        if step + 1 not in evals:
            return
        began = time.perf_counter()
        seconds = began - start - measuring[0]  # training time only
        model.eval()
        with torch.no_grad():
            scores = heldout(model, tokenizer)
            row = {"step": step + 1, "tokens": round((step + 1) * tokens_per_step),
                   "train_seconds": round(seconds, 1), **_row(scores),
                   "training_scenes": _row(own(model, tokenizer))["mean"]}
        if step + 1 == recipe.steps:  # what the last model gets wrong, two per task type
            for task in sorted({a["task"] for a in scores.answers}):
                wrong = [a for a in scores.answers if a["task"] == task and not a["correct"]]
                for answer in wrong[:args.show_wrong]:
                    print(f"wrong {task}: {answer['question']!r} -> {answer['answer']!r} "
                          f"(reference {answer['reference']!r})")
        model.train()
        measuring[0] += time.perf_counter() - began
        curve.append(row)
        print(json.dumps(row), flush=True)

    pretrain_lm(recipe, tokenizer, after_step=measure, examples=examples)
    result = {"name": args.name, "recipe": recipe.to_dict(), "threads": args.threads,
              "curve": curve}
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
