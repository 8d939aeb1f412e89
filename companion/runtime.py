"""Seeds, devices and threads: the first lines of every notebook."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from transformers.utils import logging


def pick_device(device: str = "auto"):
    """``"auto"`` picks CUDA, then Apple's MPS, then the CPU; anything else is used as given.

    Raises a clear error when a named accelerator is not available.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device={device!r} is not a device name; use auto, cpu, cuda "
                         "or mps") from exc
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available here; "
                         "use device='auto' or 'cpu'")
    if chosen.type == "mps" and not (getattr(torch.backends, "mps", None)
                                     and torch.backends.mps.is_available()):
        raise ValueError("device='mps' was asked for but MPS is not available here; "
                         "use device='auto' or 'cpu'")
    return chosen


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def quiet_transformers() -> None:
    """No progress bars or info logs from ``save_pretrained`` / ``from_pretrained``: they
    would land in the notebooks' stored outputs and change from run to run."""
    logging.disable_progress_bar()
    logging.set_verbosity_error()


def setup(seed: int = 0, device: str = "auto", threads: int | None = 2, quiet: bool = False):
    """Seed everything, fix the CPU thread count and pick the device; return the device.

    A fixed thread count keeps CPU results bit-identical between runs, which the notebook
    regression tests (nbval) rely on. ``threads=None`` leaves torch's default.
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads={threads} must be at least 1 (or None for the default)")
        torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_transformers()
    # Tiny values (Adam's second moments late in training) as denormals are slow on CPUs.
    torch.set_flush_denormal(True)
    seed_everything(seed)
    chosen = pick_device(device)
    if not quiet:
        print(f"device: {chosen.type}, torch threads: {torch.get_num_threads()}, seed: {seed}")
    return chosen
