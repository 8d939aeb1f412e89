"""Where the training compute of sections 3.2 goes: tokens per second of the LM's and the
VLM's training steps, against this machine's matrix-multiply floor.

Usage::

    python benchmarks/training_throughput.py --repeats 5 --steps 20 \\
        --out benchmarks/results/training_throughput.json

Measured, each as the median over ``--repeats`` timings of ``--steps`` optimiser steps
(forward, backward, AdamW) after two warm-up steps, at the chapter's default sizes (the LM
of ``TinyLMConfig``, the CLIP of ``TinyClipConfig``, batch 32, the world's instruction data):

* ``lm``: a step of the text-only LM pretraining (every token of the conversation is loss).
* ``vlm_pixels``: a stage-2 step from pixels (the frozen tower runs every step).
* ``vlm_cached``: the same step from cached tower features (``companion.llava``).
* ``..._bf16``: the same under ``torch.autocast("cpu", dtype=torch.bfloat16)``.
* ``lm_recipe``: a step of the book's own LM pretraining (``LMRecipe``'s defaults: six
  questions per conversation, loss on the replies), over batches of the lengths its
  length-grouped sampler draws; with ``--compile`` also ``lm_recipe_compiled``, the same
  steps through ``torch.compile`` (its compile time reported apart, and the largest
  difference of its losses from the eager ones over the timed steps).
* ``gemm``: float32 matrix products of the LM's own shapes (rows = tokens of a batch,
  128 → 384 and 384 → 128) and one of 1024³: what this CPU's BLAS reaches.

A step's model FLOPs are ``6 × parameters × tokens`` for the matrix layers it trains and
``2 × parameters × tokens`` for a frozen part's forward (attention scores added, embeddings
not counted); ``floor share`` = achieved FLOP/s ÷ the 1024³ product's FLOP/s. Times are
noisy on shared machines: compare the ratios within one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from companion.batching import grouped_rows, pad_examples  # noqa: E402
from companion.instruction import encode_records, instruction_tuning_step  # noqa: E402
from companion.models import TinyClipConfig, build_clip  # noqa: E402
from companion.stages import apply_stage  # noqa: E402
from companion.tokenizer import encode_chat, world_tokenizer  # noqa: E402
from companion.llava import image_seq_length  # noqa: E402
from companion.lm import (LMRecipe, TinyLMConfig, build_lm, lm_corpus,  # noqa: E402
                          lm_training_examples)
from companion.vlm import build_vlm  # noqa: E402
from companion.world import make_instruction_dataset, make_scenes, render_scene  # noqa: E402


def _median_seconds(step, steps: int, repeats: int) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def _matrix_params(module) -> int:
    """Parameters of the module's matrix layers (2-D weights), embeddings excluded."""
    return sum(p.numel() for n, p in module.named_parameters()
               if p.dim() == 2 and "embed" not in n)


def _gemm_flops(m: int, k: int, n: int, repeats: int) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    seconds = _median_seconds(lambda: a @ b, 10, repeats)
    return 2 * m * k * n / seconds


def _lm_recipe_rows(tokenizer, args) -> dict:
    recipe = LMRecipe()
    examples = lm_training_examples(replace(recipe, scenes=400), tokenizer)
    lengths = [len(e["input_ids"]) for e in examples]
    batches = [pad_examples([examples[r] for r in grouped_rows(lengths, recipe.batch_size, step)],
                            tokenizer.pad_token_id) for step in range(args.steps + 2)]
    tokens = statistics.mean(int(b["attention_mask"].sum()) for b in batches[2:])
    out, losses = {}, {}
    arms = [("lm_recipe", False)] + ([("lm_recipe_compiled", True)] if args.compile else [])
    for name, compiled in arms:
        model, _ = build_lm(tokenizer, sizes=recipe.sizes, seed=recipe.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        forward = torch.compile(model, dynamic=True) if compiled else model
        losses[name] = []

        def step(batch, forward=forward, optimizer=optimizer):
            loss = forward(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())

        start = time.perf_counter()
        for batch in batches[:2]:  # warm-up (and, compiled, the compilation)
            step(batch)
        warmup = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):  # the same weights go on learning: losses differ per repeat
            start = time.perf_counter()
            losses[name] = [step(batch) for batch in batches[2:]]
            times.append((time.perf_counter() - start) / args.steps)
        seconds = statistics.median(times)
        flops = 6 * _matrix_params(model) * tokens
        out[name] = {"seconds_per_step": seconds, "tokens_per_step": tokens,
                     "tokens_per_second": tokens / seconds, "flops_per_second": flops / seconds,
                     "warmup_seconds": warmup}
    if args.compile:
        row = out["lm_recipe_compiled"]
        row["time_vs_lm_recipe"] = row["seconds_per_step"] / out["lm_recipe"]["seconds_per_step"]
        row["max_loss_difference"] = max(abs(a - b) for a, b in
                                         zip(losses["lm_recipe"], losses["lm_recipe_compiled"]))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache"))
    parser.add_argument("--out", default="")
    parser.add_argument("--compile", action="store_true",
                        help="also time the book's LM step through torch.compile")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    tokenizer = world_tokenizer(args.cache_dir, n_scenes=2000, log=None)
    results = {"machine": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": {}}
    rows = results["rows"]

    # --- the text-only LM
    lm, _ = build_lm(tokenizer, sizes=TinyLMConfig(), seed=0)
    corpus = [encode_chat(tokenizer, turns)["input_ids"] for turns in lm_corpus(200, seed=0)]
    batch = pad_examples([{"input_ids": ids, "labels": ids} for ids in corpus[:args.batch]],
                         tokenizer.pad_token_id)
    tokens = int(batch["attention_mask"].sum())
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-4)

    def lm_step(bf16=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = lm(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    lm_flops = 6 * (_matrix_params(lm)) * tokens
    for name, bf16 in (("lm", False), ("lm_bf16", True)):
        seconds = _median_seconds(lambda bf16=bf16: lm_step(bf16), args.steps, args.repeats)
        rows[name] = {"seconds_per_step": seconds, "tokens_per_step": tokens,
                      "tokens_per_second": tokens / seconds, "flops_per_second": lm_flops / seconds}

    # --- the book's LM recipe, eager and (with --compile) through torch.compile
    rows.update(_lm_recipe_rows(tokenizer, args))

    # --- the VLM, stage 2 (tower frozen; projector and LM learn)
    clip, processor, _ = build_clip(tokenizer, sizes=TinyClipConfig(), seed=0)
    vlm = build_vlm(clip, build_lm(tokenizer, sizes=TinyLMConfig(), seed=0)[0], tokenizer)
    apply_stage(vlm, "stage2")
    scenes = make_scenes(args.batch, seed=5)
    by_id = {s.scene_id: s for s in scenes}
    records = make_instruction_dataset(scenes, tasks=("description", "counting", "reasoning"),
                                       seed=5)[:args.batch]
    data = encode_records(records, tokenizer, processor, image_seq_length(vlm),
                          lambda r: render_scene(by_id[r["scene_id"]], TinyClipConfig().image_size))
    pixel_batch = data.batch(args.batch, 0, pad_id=tokenizer.pad_token_id)
    data.cache_vision_features(vlm)
    cached_batch = data.batch(args.batch, 0, pad_id=tokenizer.pad_token_id)
    vlm_tokens = int(pixel_batch["attention_mask"].sum())
    trained = [p for p in vlm.parameters() if p.requires_grad]
    vlm_optimizer = torch.optim.AdamW(trained, lr=1e-4)

    def vlm_step(which, bf16=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = instruction_tuning_step(vlm, which)
        loss.backward()
        vlm_optimizer.step()
        vlm_optimizer.zero_grad(set_to_none=True)

    tower = vlm.model.vision_tower
    patches_per_image = image_seq_length(vlm) + 1
    tower_flops = 2 * _matrix_params(tower) * patches_per_image * args.batch
    train_flops = 6 * (_matrix_params(vlm.model.language_model) + _matrix_params(vlm.lm_head)
                       + _matrix_params(vlm.model.multi_modal_projector)) * vlm_tokens
    for name, which, bf16, flops in (
            ("vlm_pixels", pixel_batch, False, train_flops + tower_flops),
            ("vlm_cached", cached_batch, False, train_flops),
            ("vlm_pixels_bf16", pixel_batch, True, train_flops + tower_flops),
            ("vlm_cached_bf16", cached_batch, True, train_flops)):
        seconds = _median_seconds(lambda which=which, bf16=bf16: vlm_step(which, bf16),
                                  args.steps, args.repeats)
        rows[name] = {"seconds_per_step": seconds, "tokens_per_step": vlm_tokens,
                      "tokens_per_second": vlm_tokens / seconds,
                      "flops_per_second": flops / seconds}

    # --- the floor
    peak = _gemm_flops(1024, 1024, 1024, args.repeats)
    rows["gemm_1024"] = {"flops_per_second": peak}
    rows["gemm_lm_up"] = {"flops_per_second": _gemm_flops(tokens, 128, 384, args.repeats)}
    rows["gemm_lm_down"] = {"flops_per_second": _gemm_flops(tokens, 384, 128, args.repeats)}
    for row in rows.values():
        row["floor_share"] = row["flops_per_second"] / peak
    base = rows["vlm_pixels"]["seconds_per_step"]
    for name in ("vlm_cached", "vlm_pixels_bf16", "vlm_cached_bf16"):
        rows[name]["time_vs_vlm_pixels"] = rows[name]["seconds_per_step"] / base
    rows["lm_bf16"]["time_vs_lm"] = (rows["lm_bf16"]["seconds_per_step"]
                                     / rows["lm"]["seconds_per_step"])

    print(f"{'step':18s} {'s/step':>9s} {'tokens/s':>10s} {'GFLOP/s':>9s} {'floor':>6s}  ratio")
    for name, row in rows.items():
        ratio = next((f"{v:.2f}" for k, v in row.items() if k.startswith("time_vs")), "")
        print(f"{name:18s} {row.get('seconds_per_step', float('nan')):9.4f} "
              f"{row.get('tokens_per_second', float('nan')):10.0f} "
              f"{row['flops_per_second'] / 1e9:9.2f} {row['floor_share']:6.1%}  {ratio}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
