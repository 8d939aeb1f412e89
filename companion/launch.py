"""The 3.4 pipeline as a command, in one process or many (``torchrun``).

    python -m companion pipeline run --profile gpu
    torchrun --nproc_per_node 8 -m companion pipeline run --profile gpu
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint HOST:29500 -m companion pipeline run --profile gpu   # on each machine

The parameters are notebook 3.4's: its defaults, then the profile's values from book.toml,
then ``-p KEY=VALUE``; the run folder is the notebook's (``<cache_dir>/pipeline``), so the
command and the notebook resume each other's stages. torchrun sets ``WORLD_SIZE``, ``RANK``
and ``LOCAL_RANK``; :func:`init_distributed` joins that process group (NCCL with one GPU a
process, gloo on CPUs) and the shared training loop does the rest (``companion.train``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import ast
import torch
import torch.distributed as dist

from companion.book import BookConfigError, load_book, notebook_parameters, parse_overrides
from companion.distributed import rank_and_world
from companion.pipeline import config_from_parameters, run_pipeline
from companion.runtime import setup

PIPELINE_CHAPTER = "3.4"


def init_distributed(device: str = "auto", threads: int | None = None, seed: int = 0):
    """Seed, fix threads and pick this process's device; join torchrun's process group
    when launched by it (``WORLD_SIZE > 1``). Returns the device.

    Under torchrun with GPUs each process takes ``cuda:LOCAL_RANK`` and NCCL; without GPUs
    the processes share the CPUs over gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    chosen = setup(seed=seed, device=device, threads=threads, quiet=True)
    if world == 1:
        return chosen
    if chosen.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but this machine has "
                               f"{torch.cuda.device_count()} GPU(s); set --nproc_per_node to "
                               "at most the number of GPUs")
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    elif chosen.type != "cpu":
        raise RuntimeError(f"torchrun on device {chosen.type!r}: only cuda (NCCL) and cpu "
                           "(gloo) take part in a process group; pass --device cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return chosen


def pipeline_parameters(profile: str = "default", overrides: dict | None = None,
                        manifest=None) -> tuple[dict, Path]:
    """Notebook 3.4's parameters under ``profile`` (its defaults, the profile's values, then
    ``overrides``) and the run folder the notebook uses, ``<cache_dir>/pipeline``."""
    book = load_book(manifest)
    chapter = next(c for c in book.chapters if c.id == PIPELINE_CHAPTER)
    params = {}
    for name, spec in notebook_parameters(chapter.notebook).items():
        try:
            params[name] = ast.literal_eval(spec["default"])
        except (ValueError, SyntaxError):
            continue  # not a literal (none of the pipeline's settings)
    params.update(book.profile(profile).parameters_for(PIPELINE_CHAPTER))
    unknown = sorted(set(overrides or {}) - set(params))
    if unknown:
        raise ValueError(f"-p {', '.join(unknown)}: notebook {PIPELINE_CHAPTER} declares no such "
                         f"parameter; see `python -m companion book list`")
    params.update(overrides or {})
    return params, book.cache_dir / "pipeline"


def _parse(argv: list[str]):
    parser = argparse.ArgumentParser(
        prog="python -m companion pipeline",
        description="Run (or resume) the LLaVA-1.5 pipeline of section 3.4; under torchrun "
                    "the stages train data-parallel.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run or resume every stage")
    run.add_argument("--profile", default="default", help="parameter profile (book.toml)")
    run.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                     help="override one of notebook 3.4's parameters")
    run.add_argument("--run-dir", default=None,
                     help="run folder (default: <cache_dir>/pipeline, the notebook's)")
    run.add_argument("--device", default=None,
                     help="cuda, cpu, ... (default: the profile's, else auto)")
    run.add_argument("--checkpoint-every", type=int, default=100, metavar="STEPS",
                     help="checkpoint a stage every STEPS optimiser steps (0: only whole stages)")
    run.add_argument("--manifest", default=None, help="path to book.toml")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.param)
    except BookConfigError as exc:
        parser.error(str(exc))
    return args, overrides


def main_pipeline(argv: list[str]) -> int:
    """``python -m companion pipeline run ...``: see the module docstring."""
    args, overrides = _parse(argv)
    try:
        params, run_dir = pipeline_parameters(args.profile, overrides, args.manifest)
        config = config_from_parameters(params)
    except (BookConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = init_distributed(args.device or params.get("device", "auto"),
                              params.get("threads"), params.get("seed", 0))
    rank, world = rank_and_world()
    run_dir = Path(args.run_dir) if args.run_dir else run_dir
    say = print if rank == 0 else (lambda *_: None)
    say(f"pipeline: profile {args.profile}, {world} process(es) on {device.type}, "
        f"run folder {run_dir}")
    try:
        result = run_pipeline(config, run_dir, device=device, log=say,
                              checkpoint_every=args.checkpoint_every or None)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    say("\nstage checkpoints:")
    for stage in result.stages:
        say(f"  {stage.name:>7}  {stage.folder}")
    return 0
