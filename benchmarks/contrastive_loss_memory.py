"""Time and memory of the plain vs the tiled InfoNCE loss, forward + backward.

Usage::

    python benchmarks/contrastive_loss_memory.py --sizes 4096 16384 32768 --dim 256 \\
        --repeats 3 --out benchmarks/results/contrastive_loss_memory.json

Every (method, N) runs in its own fresh subprocess (``--worker``), so one run's peak memory
cannot hide another's. Methods:

* ``plain``: ``companion.info_nce_loss`` (materialises the N×N logits and their gradient).
* ``tiled``: ``companion.tiled_info_nce_loss`` (strips of ``--tile-size`` rows).
* ``gemm_floor``: only the four N×N×D matrix products a forward + backward cannot avoid
  (S = X·Yᵀ forward, its recomputation, G·Y and Gᵀ·X), strip by strip with the same tile
  size and the same calls as the tiled kernel: the time floor for this machine.

Measured per run: forward+backward time (median of ``--repeats`` after one warm-up at a
small N), peak memory (CPU: the process's peak RSS, ``ru_maxrss``; CUDA: the allocator's
peak), and loss memory = peak minus the memory in use just before the first loss call
(CPU: RSS from /proc/self/statm; CUDA: ``memory_allocated``). Feature gradients are created
inside the loss call, so they count as loss memory for every method alike.

Acceptance targets (N = 16384, D = 256): tiled time <= 0.6 × plain and <= 1.3 × GEMM floor,
tiled loss memory <= 0.05 × plain's; at N = 32768 the tiled run peaks below 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("plain", "tiled", "gemm_floor")
MIB = 1024 * 1024
# Bytes per N² of the plain loss: logits, softmax / grads of rows and columns (~5 float32 N×N).
PLAIN_BYTES_PER_CELL = 5 * 4
WARMUP_N = 512


# ---------------------------------------------------------------------------------------
# worker: one (method, N) in a fresh process
# ---------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    """Current resident set size of this process (second field of /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _gemm_floor(x, y, tile_size: int) -> None:
    """The four N×N×D products of a tiled forward + backward, nothing else."""
    import torch

    n = x.shape[0]
    with torch.no_grad():
        buf = torch.empty(min(tile_size, n), n, dtype=x.dtype, device=x.device)  # [T, N]
        for start in range(0, n, tile_size):  # forward: S strips
            stop = min(start + tile_size, n)
            torch.mm(x[start:stop], y.T, out=buf[: stop - start])
        gx, gy = torch.empty_like(x), torch.zeros_like(y)  # [N, D]
        for start in range(0, n, tile_size):  # backward: recompute S, then G·Y and Gᵀ·X
            stop = min(start + tile_size, n)
            s = torch.mm(x[start:stop], y.T, out=buf[: stop - start])  # [t, N]
            torch.mm(s, y, out=gx[start:stop])  # [t, D]
            gy.addmm_(s.T, x[start:stop])  # [N, D]


def _make_step(method: str, tile_size: int):
    """A function (x, y) -> None running one forward + backward of ``method``."""
    from companion import info_nce_loss, tiled_info_nce_loss

    if method == "plain":
        return lambda x, y: info_nce_loss(x, y).backward()
    if method == "tiled":
        return lambda x, y: tiled_info_nce_loss(x, y, tile_size=tile_size).backward()
    if method == "gemm_floor":
        return lambda x, y: _gemm_floor(x, y, tile_size)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def worker(method: str, n: int, dim: int, repeats: int, tile_size: int, device: str) -> dict:
    """Measure one (method, N); returns a JSON-serialisable dict."""
    import torch

    torch.manual_seed(0)
    step = _make_step(method, tile_size)
    cuda = device == "cuda"

    def features(rows):
        x = torch.randn(rows, dim, device=device, requires_grad=method != "gemm_floor")
        y = torch.randn(rows, dim, device=device, requires_grad=method != "gemm_floor")
        return x, y

    # warm-up at a small size (kernels, thread pool, allocator)
    step(*features(min(WARMUP_N, n)))
    _sync(device)

    x, y = features(n)
    _sync(device)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    times = []
    for _ in range(repeats):
        x.grad = y.grad = None
        _sync(device)
        start = time.perf_counter()
        step(x, y)
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()
    return {
        "method": method,
        "n": n,
        "dim": dim,
        "tile_size": tile_size,
        "times_s": times,
        "time_s": statistics.median(times),
        "peak_mib": peak / MIB,
        "loss_mib": (peak - before) / MIB,
        "memory_kind": "cuda_allocated" if cuda else "rss",
    }


# ---------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------


def _mem_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _skip_reason(method: str, n: int, device: str, safety: float) -> str | None:
    """Why a plain run at this N would not fit in memory, or None if it should run."""
    if method != "plain":
        return None
    need = PLAIN_BYTES_PER_CELL * n * n
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        have, where = free, "free GPU memory"
    else:
        have, where = _mem_available_bytes(), "MemAvailable"
        if have is None:
            return None
    if need > safety * have:
        return (
            f"plain N={n} needs ~{need / 2**30:.1f} GiB (5·N²·4 B) > {safety:.0%} of "
            f"{where} {have / 2**30:.1f} GiB"
        )
    return None


def _run_worker(args, method: str, n: int, device: str) -> dict:
    """Run one measurement in a fresh interpreter and parse its JSON line."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--method",
        method,
        "--n",
        str(n),
        "--dim",
        str(args.dim),
        "--repeats",
        str(args.repeats),
        "--tile-size",
        str(args.tile_size),
        "--device",
        device,
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-2000:]
        return {"method": method, "n": n, "error": f"worker exited with {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _machine_info(device: str) -> dict:
    import torch

    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _ratios(results: list[dict]) -> dict[int, dict]:
    """tiled/plain time and loss memory, tiled/gemm_floor time, per N."""
    by = {(r["method"], r["n"]): r for r in results if "time_s" in r}
    out = {}
    for n in sorted({r["n"] for r in results}):
        tiled, plain, floor = by.get(("tiled", n)), by.get(("plain", n)), by.get(("gemm_floor", n))
        row = {}
        if tiled and plain:
            row["tiled_over_plain_time"] = tiled["time_s"] / plain["time_s"]
            row["tiled_over_plain_loss_mem"] = tiled["loss_mib"] / max(plain["loss_mib"], 1e-9)
        if tiled and floor:
            row["tiled_over_gemm_floor_time"] = tiled["time_s"] / floor["time_s"]
        out[n] = row
    return out


def _print_table(results: list[dict], ratios: dict[int, dict]) -> None:
    print(f"{'N':>7} {'method':>11} {'time s':>8} {'peak MiB':>9} {'loss MiB':>9}")
    for r in results:
        if "time_s" in r:
            cells = f"{r['time_s']:>8.3f} {r['peak_mib']:>9.0f} {r['loss_mib']:>9.0f}"
            print(f"{r['n']:>7} {r['method']:>11} {cells}")
        else:
            print(f"{r['n']:>7} {r['method']:>11}  skipped: {r.get('skipped') or r.get('error')}")
    print()
    heads = ("tiled/plain time", "tiled/plain loss mem", "tiled/gemm_floor time")
    print(f"{'N':>7} {heads[0]:>17} {heads[1]:>21} {heads[2]:>22}")
    for n, row in ratios.items():
        cells = [
            row.get(k)
            for k in (
                "tiled_over_plain_time",
                "tiled_over_plain_loss_mem",
                "tiled_over_gemm_floor_time",
            )
        ]
        text = [f"{v:.3f}" if v is not None else "-" for v in cells]
        print(f"{n:>7} {text[0]:>17} {text[1]:>21} {text[2]:>22}")


def _check_targets(results: list[dict], ratios: dict[int, dict]) -> dict:
    """The issue's acceptance targets, where this run measured what they need."""
    checks = {}
    row = ratios.get(16384, {})
    if "tiled_over_plain_time" in row:
        checks["N16384: tiled time <= 0.6 x plain"] = row["tiled_over_plain_time"] <= 0.6
        checks["N16384: tiled loss mem <= 0.05 x plain"] = row["tiled_over_plain_loss_mem"] <= 0.05
    if "tiled_over_gemm_floor_time" in row:
        checks["N16384: tiled time <= 1.3 x gemm floor"] = row["tiled_over_gemm_floor_time"] <= 1.3
    for r in results:
        if r["method"] == "tiled" and r["n"] == 32768 and "peak_mib" in r:
            checks["N32768: tiled peak < 1 GiB"] = r["peak_mib"] < 1024
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return checks


def main(argv=None) -> int:
    from companion.losses.tiled import DEFAULT_TILE_SIZE

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[4096, 16384, 32768], help="batch sizes N"
    )
    parser.add_argument("--dim", type=int, default=256, help="feature dimension D")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed forward+backward runs (median)"
    )
    parser.add_argument(
        "--tile-size",
        type=int,
        default=DEFAULT_TILE_SIZE,
        help="rows per strip (tiled, gemm_floor)",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--memory-safety",
        type=float,
        default=0.75,
        help="skip plain when 5·N²·4 B exceeds this fraction of available memory",
    )
    parser.add_argument("--out", default="benchmarks/results/contrastive_loss_memory.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tile_size < 1 or args.dim < 1 or args.repeats < 1 or min(args.sizes) < 1:
        parser.error("--tile-size, --dim, --repeats and --sizes must all be >= 1")

    if args.worker:
        print(
            json.dumps(
                worker(args.method, args.n, args.dim, args.repeats, args.tile_size, args.device)
            )
        )
        return 0

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f} (cpus: {os.cpu_count()})", flush=True)
    results = []
    for n in args.sizes:
        for method in args.methods:
            reason = _skip_reason(method, n, device, args.memory_safety)
            if reason:
                print(f"skip {method} N={n}: {reason}", flush=True)
                results.append({"method": method, "n": n, "skipped": reason})
                continue
            print(f"run  {method} N={n} ...", end=" ", flush=True)
            result = _run_worker(args, method, n, device)
            print(
                f"{result['time_s']:.3f} s" if "time_s" in result else result["error"], flush=True
            )
            results.append(result)
    ratios = _ratios(results)
    print()
    _print_table(results, ratios)
    print()
    checks = _check_targets(results, ratios)
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f} (other processes slow every method down)")
    report = {
        "machine": _machine_info(device),
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "method", "n")},
        "results": results,
        "ratios": {str(n): row for n, row in ratios.items()},
        "targets": checks,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nsaved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
