"""Section 3.3.1's reward models under other recipes: the plain one (image + reply) and the
factual one (image + the scene in words + reply, LLaVA-RLHF's Fact-RLHF), each trained on
the cached preference pairs of the default 3.3 recipe (the 3.2 model and its pairs from the
cache, trained there if missing) and scored on the held-out pairs, beside the 3.2 model's
own log-likelihood.

Usage::

    python benchmarks/reward_models.py '{}' '{"rm_factual": true}' \\
        '{"rm_factual": true, "rm_steps": 800}' --out benchmarks/results/reward_models.jsonl

Each argument is one run, a JSON object of ``RLHFRecipe`` fields (``rm_factual``,
``rm_pooling``, ``rm_steps``, ``rm_lr``, ``rm_batch_size``); the pairs are always the
default recipe's. One JSON line per run: the options, the training seconds, the held-out
pair accuracy, by task, and the last training loss. First, for each prompt layout used, the
free baseline: the 3.2 model's own log-likelihood of each reply (``"likelihood": true``).
``--annotator-rate R`` does all of it for the 3.2 recipe trained on machine-written data
(the careless annotator at rate R) and the pairs sampled from that model.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from companion.dpo import reference_logps  # noqa: E402
from companion.instruction import InstructionRecipe  # noqa: E402
from companion.preference import score_pairs  # noqa: E402
from companion.rlhf import (RLHFRecipe, preference_data, preference_records, rlhf_prompts,  # noqa: E402
                            sft_model, train_reward_model)
from companion.runtime import setup  # noqa: E402
from levers_cli import lever_parser, parse_runs, report  # noqa: E402  (this folder)

RM_FIELDS = {"rm_factual", "rm_pooling", "rm_steps", "rm_lr", "rm_batch_size"}
# not a recipe field (yet): train the factual likelihood reward model relative to the 3.2
# model's log-prob of the reply *without* the facts, so that its reward is how much more
# likely the facts make the reply (starts at the "likelihood_gain_from_facts" baseline)
EXTRA = {"fact_gain", "rm_base", "facts_boxes"}
# "facts_boxes": true gives the factual reward model each object's box in the facts too
# (the LM never read boxes in its pretraining; grounding replies state boxes)
# not a recipe field (yet) either: "rm_base": "clean" starts the reward model from 3.2's
# clean-data model instead of the SFT policy that sampled the pairs (with --annotator-rate,
# the policy learned hallucinations from its data; the clean model did not)


# every run's options are changes from the seed's reward model and PPO on raw scores (the
# recipe's defaults when these results were recorded), from 3.2's clean model, so the
# recorded rows keep their meaning
SEEDS_RECIPE = RLHFRecipe(sft=InstructionRecipe(), rm_factual=False, rm_pooling="last",
                          rm_lr=3e-4, ppo_score_norm=False)


def by_task(records, correct) -> dict[str, float]:
    tasks = sorted({r["task"] for r in records})
    return {t: round(sum(c for r, c in zip(records, correct) if r["task"] == t)
                     / sum(r["task"] == t for r in records), 3) for t in tasks}


def main(argv=None) -> int:
    parser = lever_parser(__doc__)
    parser.add_argument("--annotator-rate", type=float, default=0.0,
                        help="the SFT model is 3.2's recipe trained on machine-written data at "
                             "this careless-annotator rate (cached, trained if missing); its "
                             "pairs are sampled from it (default 0: the clean 3.2 model)")
    args = parser.parse_args(argv)

    def check(options):
        unknown = set(options) - RM_FIELDS - EXTRA
        if options.get("fact_gain") and not (options.get("rm_factual")
                                             and options.get("rm_pooling") == "likelihood"):
            raise ValueError("fact_gain needs rm_factual true and rm_pooling 'likelihood'")
        if options.get("rm_base", "sft") not in ("sft", "clean"):
            raise ValueError(f"rm_base={options['rm_base']!r}; choose 'sft' or 'clean'")
        if options.get("rm_base") == "clean" and not args.annotator_rate:
            raise ValueError("rm_base 'clean' needs --annotator-rate above 0: without it the "
                             "SFT policy is 3.2's clean model already")
        if unknown:
            raise ValueError(f"only reward-model fields can change here "
                             f"({', '.join(sorted(RM_FIELDS))}), not {', '.join(sorted(unknown))}")

    options = parse_runs(parser, args.runs, check, "reward-model fields")
    device = setup(seed=0, device="cpu", threads=args.threads)
    base = SEEDS_RECIPE
    base = dataclasses.replace(base, sft=dataclasses.replace(
        base.sft, annotator_hallucination_rate=args.annotator_rate))
    sft, processor, tokenizer = sft_model(args.cache_dir, base, device, log=None)
    records = preference_records(args.cache_dir, base, device, log=None)
    heldout = [r for r in records if r["split"] == "heldout"]
    by_id = rlhf_prompts(base, processor, sft.config.vision_config.image_size)[0]
    pad = tokenizer.pad_token_id
    data = {}
    for factual in (False, True):  # both, for the pointwise-mutual-information baseline
        data[factual] = {split: preference_data(records, split, tokenizer, processor, sft, by_id,
                                                factual=factual)
                         for split in ("train", "heldout")}
    if any(o.get("facts_boxes") for o in options):  # the facts with every object's box
        import companion.rlhf as rlhf_module
        from companion.lm import scene_as_text

        plain_facts = rlhf_module.scene_facts  # swapped for this encoding only
        rlhf_module.scene_facts = lambda scenes, ids: [scene_as_text(scenes[i], boxes=True)
                                                       for i in ids]
        try:
            data["boxes"] = {split: preference_data(records, split, tokenizer, processor, sft,
                                                    by_id, factual=True)
                             for split in ("train", "heldout")}
        finally:
            rlhf_module.scene_facts = plain_facts
    print(f"{len(records) - len(heldout)} training pairs, {len(heldout)} held out")
    for split in ("train", "heldout"):
        if len(data[True][split]) != len(data[False][split]):
            raise ValueError(f"{split}: the factual and plain encodings skipped different "
                             "pairs; their scores cannot be paired")
    clean = None
    if any(o.get("rm_base") == "clean" for o in options) and args.annotator_rate:
        clean, _, _ = sft_model(args.cache_dir, SEEDS_RECIPE, device, log=None)
    logps = {}
    rate = {"annotator_hallucination_rate": args.annotator_rate} if args.annotator_rate else {}
    for factual, splits in data.items():  # the free baselines: no reward model at all
        chosen, rejected = logps[factual] = reference_logps(sft, splits["heldout"], pad)
        correct = (chosen > rejected).tolist()
        row = {"options": {"likelihood": True, "rm_factual": factual, **rate},
               "heldout_pair_accuracy": round(sum(correct) / len(correct), 3),
               "by_task": by_task(heldout, correct), "pairs_heldout": len(correct)}
        report(row, args.out)
        if clean is not None:  # the clean model's likelihood of the same replies
            chosen, rejected = reference_logps(clean, splits["heldout"], pad)
            correct = (chosen > rejected).tolist()
            report({**row, "options": {**row["options"], "rm_base": "clean"},
                    "heldout_pair_accuracy": round(sum(correct) / len(correct), 3),
                    "by_task": by_task(heldout, correct)}, args.out)
    # how much more likely the facts make a reply: log p(y | image, facts) - log p(y | image),
    # the pointwise mutual information of reply and facts under the 3.2 model (no training)
    gain_chosen = logps[True][0] - logps[False][0]
    gain_rejected = logps[True][1] - logps[False][1]
    correct = (gain_chosen > gain_rejected).tolist()
    report({"options": {"likelihood_gain_from_facts": True, **rate},
            "heldout_pair_accuracy": round(sum(correct) / len(correct), 3),
            "by_task": by_task(heldout, correct), "pairs_heldout": len(correct)}, args.out)
    for option in options:
        recipe = dataclasses.replace(base, **{k: v for k, v in option.items() if k not in EXTRA})
        if args.annotator_rate:
            option = {**option, "annotator_hallucination_rate": args.annotator_rate}
        layout = "boxes" if option.get("facts_boxes") else recipe.rm_factual
        train, test = data[layout]["train"], data[layout]["heldout"]
        offsets = test_offsets = None
        if option.get("fact_gain"):
            offsets = reference_logps(sft, data[False]["train"], pad)
            test_offsets = logps[False]
        start = time.perf_counter()
        start_model = clean if option.get("rm_base") == "clean" else sft
        model, history = train_reward_model(start_model, train, pad, recipe.rm_pooling,
                                            recipe.rm_steps, recipe.rm_lr, recipe.rm_batch_size,
                                            recipe.seed, device, log=lambda _: None,
                                            offsets=offsets)
        seconds = time.perf_counter() - start
        chosen, rejected = score_pairs(model, test, pad)
        if test_offsets is not None:
            chosen, rejected = chosen - test_offsets[0], rejected - test_offsets[1]
        correct = (chosen > rejected).tolist()
        row = {"options": option, "train_seconds": round(seconds, 1),
               "heldout_pair_accuracy": round(sum(correct) / len(correct), 3),
               "by_task": by_task(heldout, correct), "pairs_heldout": len(correct),
               "last_train_loss": round(history.steps[-1]["loss"], 4)
               if history.steps and "loss" in history.steps[-1] else None}
        report(row, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
