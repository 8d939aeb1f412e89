"""Section 3.3.2's PPO under other reward models and PPO settings: the 3.2 model (cache)
as policy and reference, the reward model of the given recipe (cache, or trained now on
3.3.1's pairs), PPO, then notebook 3.3.2's held-out evaluation (3.2's 60 held-out scenes,
every record played as a chat and judged), paired answer by answer against the 3.2 model.

Usage::

    python benchmarks/ppo_levers.py '{}' '{"rm_factual": true, "rm_pooling": "likelihood",
        "rm_lr": 1e-4}' --out benchmarks/results/ppo_levers.jsonl

Each argument is one run, a JSON object of ``RLHFRecipe`` fields other than the 3.2 model's
(``rm_*`` and ``ppo_*``), and ``annotator_hallucination_rate``: the SFT model is then 3.2's
recipe trained on machine-written data (cached, trained if missing), as the policy, the
reference and the source of the reward model's pairs. One JSON line per run: the options,
the PPO seconds, the policy's and the 3.2 model's held-out rows, and the changes against
the 3.2 model with standard errors.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from companion.instruction import InstructionRecipe  # noqa: E402
from companion.rlhf import (RLHFRecipe, evaluate_policy, heldout_prompts, reward_model,  # noqa: E402
                            run_ppo, sft_model, versus_reference_model)
from companion.runtime import setup  # noqa: E402
from levers_cli import lever_parser, parse_runs, report  # noqa: E402  (this folder)

TEST_SCENES = 60  # notebook 3.2's and 3.3.2's held-out scenes
# fields of the SFT model's own recipe that may change too: the careless annotator's rate
# trains (or loads) 3.2's recipe on machine-written data, and the pairs are sampled from it
SFT_FIELDS = {"annotator_hallucination_rate"}


# every run's options are changes from the seed's reward model and PPO on raw scores (the
# recipe's defaults when these results were recorded), from 3.2's clean model, so the
# recorded rows keep their meaning
SEEDS_RECIPE = RLHFRecipe(sft=InstructionRecipe(), rm_factual=False, rm_pooling="last",
                          rm_lr=3e-4, ppo_score_norm=False)


def recipe_for(option: dict) -> RLHFRecipe:
    sft_fields = {k: v for k, v in option.items() if k in SFT_FIELDS}
    base = SEEDS_RECIPE
    return dataclasses.replace(base, sft=dataclasses.replace(base.sft, **sft_fields),
                               **{k: v for k, v in option.items() if k not in SFT_FIELDS})


def main(argv=None) -> int:
    parser = lever_parser(__doc__)
    args = parser.parse_args(argv)

    def check(options):
        bad = [k for k in options if not k.startswith(("rm_", "ppo_")) and k not in SFT_FIELDS]
        if bad:
            raise ValueError(f"only rm_* and ppo_* fields and {', '.join(sorted(SFT_FIELDS))} "
                             f"can change here, not {', '.join(bad)}")
        recipe_for(options)

    options = parse_runs(parser, args.runs, check, "RLHFRecipe fields")
    device = setup(seed=0, device="cpu", threads=args.threads)
    for option in options:
        recipe = recipe_for(option)
        # the SFT model (3.2's recipe, on machine-written data if the option says so; cached)
        sft, processor, tokenizer = sft_model(args.cache_dir, recipe, device, log=None)
        heldout = heldout_prompts(recipe, TEST_SCENES, processor,
                                  sft.config.vision_config.image_size)
        reward, _ = reward_model(args.cache_dir, recipe, device, log=None)
        start = time.perf_counter()
        policy, history = run_ppo(recipe, sft, reward, tokenizer, processor, device=device)
        seconds = time.perf_counter() - start
        rows, judged = {}, {}
        for name, model in (("SFT (3.2)", sft), ("PPO", policy)):
            rows[name], judged[name] = evaluate_policy(model, sft, reward, tokenizer, heldout,
                                                       factual=recipe.rm_factual)
        change = versus_reference_model(judged, base="SFT (3.2)")["PPO"]
        last = history.steps[-10:]
        row = {"options": option, "ppo_seconds": round(seconds, 1),
               "last10_reward": round(sum(r["reward"] for r in last) / len(last), 4),
               "last10_kl": round(sum(r["kl"] for r in last) / len(last), 4),
               "sft": rows["SFT (3.2)"], "ppo": rows["PPO"],
               "hallucination_change": round(change["hallucination_change"], 4),
               "hallucination_se": round(change["hallucination_se"], 4),
               "accuracy_change": round(change["accuracy_change"], 4),
               "accuracy_se": round(change["accuracy_se"], 4)}
        report(row, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
