"""Local loss + gather with gradient on 2 gloo processes equals one process on the whole batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from companion import info_nce_loss
from companion.distributed import distributed_info_nce_loss, gather_with_grad

WORLD = 2
LOCAL_BATCH = 5
DIM = 7
TEMPERATURE = 0.1
F64 = torch.float64


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _batch():
    """The fixed global batch every rank (and the reference) builds."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(WORLD * LOCAL_BATCH, DIM, generator=g, dtype=F64)
    texts = torch.randn(WORLD * LOCAL_BATCH, DIM, generator=g, dtype=F64)
    return images, texts


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: the distributed loss on its slice, saved with its gradients."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        images, texts = _batch()
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        result = {}
        for learnable in (False, True):
            x = images[rows].clone().requires_grad_()
            y = texts[rows].clone().requires_grad_()
            temperature = (
                torch.tensor(TEMPERATURE, dtype=F64, requires_grad=True)
                if learnable
                else TEMPERATURE
            )
            loss = distributed_info_nce_loss(x, y, temperature)
            loss.backward()
            result[learnable] = {
                "loss": loss.detach(),
                "grad_x": x.grad,
                "grad_y": y.grad,
                "grad_t": temperature.grad if learnable else None,
            }
        # unequal local batch sizes must fail with a clear message on every rank
        try:
            gather_with_grad(torch.zeros(3 + rank, DIM, dtype=F64))
            result["unequal"] = "no error"
        except ValueError as error:
            result["unequal"] = str(error)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.distributed
@pytest.mark.parametrize("learnable", [False, True])
def test_mean_loss_and_scaled_gradients_match_single_process(rank_results, learnable):
    images, texts = _batch()
    x, y = images.clone().requires_grad_(), texts.clone().requires_grad_()
    temperature = (
        torch.tensor(TEMPERATURE, dtype=F64, requires_grad=True) if learnable else TEMPERATURE
    )
    reference = info_nce_loss(x, y, temperature)
    reference.backward()

    results = [r[learnable] for r in rank_results]
    mean_loss = sum(r["loss"] for r in results) / WORLD
    torch.testing.assert_close(mean_loss, reference.detach(), rtol=1e-12, atol=1e-12)
    # each rank's gradient is WORLD times the single-process one; DDP divides by WORLD
    grad_x = torch.cat([r["grad_x"] for r in results]) / WORLD
    grad_y = torch.cat([r["grad_y"] for r in results]) / WORLD
    torch.testing.assert_close(grad_x, x.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_y, y.grad, rtol=1e-10, atol=1e-12)
    if learnable:  # DDP's average of the per-rank temperature gradients
        grad_t = sum(r["grad_t"] for r in results) / WORLD
        torch.testing.assert_close(grad_t, temperature.grad, rtol=1e-10, atol=1e-12)
    # the per-rank losses differ (each rank holds other rows), so the test is not vacuous
    assert not torch.allclose(results[0]["loss"], results[1]["loss"])


@pytest.mark.distributed
def test_unequal_local_batches_raise_on_every_rank(rank_results):
    for result in rank_results:
        assert "same shape on every rank" in result["unequal"]
        assert "(3, 7)" in result["unequal"] and "(4, 7)" in result["unequal"]


def test_falls_back_to_info_nce_without_process_group():
    images, texts = _batch()
    torch.testing.assert_close(
        distributed_info_nce_loss(images, texts, 0.2), info_nce_loss(images, texts, 0.2)
    )
    assert gather_with_grad(images) is images


@pytest.mark.distributed
def test_torchrun_demo_reports_agreement():
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "companion.distributed",
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout and "|loss difference|" in proc.stdout
