"""Contrastive loss under data parallelism: local loss + gather with gradient (open_clip).

Each of W ranks holds b image/text pairs. The InfoNCE negatives should be the whole global
batch of N = W·b, so every rank gathers all features and scores

    rows    its own b images against all N texts    (labels arange(b) + b·rank)
    columns its own b texts  against all N images

``gather_with_grad`` is an all_gather whose backward all_reduces (sums) the incoming gradient
and returns this rank's slice, so features on other ranks receive the gradient of every
rank's loss. Two identities make it equal to one big batch (tested in
tests/test_distributed_loss.py, checked by the demo below):

* the mean over ranks of the per-rank losses is the single-process loss on the
  concatenated batch (each rank holds b of the N rows and b of the N columns);
* each rank's feature gradient is the gradient of the *sum* of the rank losses, i.e. W times
  that of their mean; DDP averages gradients over ranks (divides by W), which gives exactly
  the single-process gradient. A learnable temperature gets the per-rank gradient of its
  own loss, and DDP's average of those is again the single-process gradient.

Gathering with gradient but scoring all N rows on every rank instead of the local ones
counts every term W times (open_clip #616); the local rows avoid that and cost O(b·N).

Demo (CPU gloo, or NCCL with one GPU per process)::

    torchrun --nproc_per_node 2 -m companion.distributed
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from companion.losses.checks import as_scalar, check_features, check_positive_scalar
from companion.losses.contrastive import info_nce_loss

__all__ = ["distributed_info_nce_loss", "gather_with_grad", "is_distributed", "rank_and_world"]


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the process group; ``(0, 1)`` without one (or with one rank)."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def _check_equal_shapes(tensor: torch.Tensor, name: str) -> None:
    """Raise on every rank alike unless all ranks hold tensors of the same shape."""
    shape = torch.tensor(tensor.shape, dtype=torch.long, device=tensor.device)  # [ndim]
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    shapes = [tuple(s.tolist()) for s in shapes]
    if len(set(shapes)) != 1:
        raise ValueError(
            f"{name} must have the same shape on every rank (equal local batch sizes), got "
            f"{shapes} on ranks 0..{len(shapes) - 1}; use drop_last=True in the DataLoader / "
            "DistributedSampler"
        )


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; backward: all_reduce(sum) the gradient, keep own slice."""

    @staticmethod
    def forward(ctx, tensor):
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(tensor) for _ in range(world)]  # W × [b, ...]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rank, ctx.b = rank, tensor.shape[0]
        return torch.cat(parts, dim=0)  # [W·b, ...]

    @staticmethod
    def backward(ctx, grad_output):
        grad = grad_output.contiguous().clone()  # [W·b, ...], this rank's ∂loss_r/∂gathered
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # Σ_r ∂loss_r/∂gathered
        return grad[ctx.rank * ctx.b : (ctx.rank + 1) * ctx.b]  # [b, ...], own slice


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather ``tensor`` [b, ...] from every rank into [W·b, ...], differentiably.

    The backward sums the gradients all ranks computed for the gathered tensor and returns
    this rank's slice (open_clip's ``gather_features(..., gather_with_grad=True)``). Every
    rank must call it, with the same shape (checked, with an extra tiny all_gather). Without
    an initialised process group (or with one rank) it returns ``tensor`` unchanged.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if not is_distributed():
        return tensor
    if tensor.ndim == 0:
        raise ValueError("tensor must have a batch dimension (ndim >= 1), got a 0-d tensor")
    _check_equal_shapes(tensor, "tensor")
    return _GatherWithGrad.apply(tensor)


def distributed_info_nce_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    temperature: float | torch.Tensor = 0.07,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """This rank's share of the global-batch InfoNCE (CLIP), open_clip's local loss.

    ``L_r = ½ [CE(s·X_r·Yᵀ, y_r) + CE(s·Y_r·Xᵀ, y_r)]`` with ``X, Y`` the features gathered
    from all ranks (with gradient), ``X_r, Y_r`` this rank's, ``s = 1/τ`` and labels
    ``y_r = arange(b) + b·rank``. ``mean_r L_r`` equals ``info_nce_loss`` of the concatenated
    batch; DDP's gradient averaging then yields its gradients (see the module docstring).

    Args:
        image_features: [b, D] this rank's image embeddings.
        text_features: [b, D] this rank's text embeddings (row i pairs with image row i).
        temperature: τ > 0, float or 0-d tensor (may require grad; same on every rank).
        normalize: L2-normalise rows before gathering.

    Falls back to ``info_nce_loss`` without an initialised process group or with one rank.
    Validation happens per rank: a bad input on one rank raises there while the other ranks
    wait in the collective, so check inputs the same way everywhere.
    """
    if not is_distributed():
        return info_nce_loss(image_features, text_features, temperature, normalize=normalize)
    check_features(image_features, text_features)
    check_positive_scalar(temperature, "temperature")
    x, y = image_features, text_features
    if normalize:
        x = F.normalize(x, dim=1)  # [b, D]
        y = F.normalize(y, dim=1)  # [b, D]
    all_x = gather_with_grad(x)  # [N, D], N = W·b
    all_y = gather_with_grad(y)  # [N, D]
    b, rank = x.shape[0], dist.get_rank()
    labels = torch.arange(b, device=x.device) + b * rank  # [b], positions of the positives
    temperature = as_scalar(temperature)
    logits_image = x @ all_y.T / temperature  # [b, N], local images vs all texts
    logits_text = y @ all_x.T / temperature  # [b, N], local texts vs all images
    return (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels)) / 2


# ---------------------------------------------------------------------------------------
# demo: torchrun --nproc_per_node 2 -m companion.distributed
# ---------------------------------------------------------------------------------------


def _demo(local_batch: int = 8, dim: int = 16, seed: int = 0) -> int:
    """Check the distributed loss and gradients against one process on the whole batch."""
    use_nccl = torch.cuda.is_available() and torch.cuda.device_count() >= int(
        os.environ.get("WORLD_SIZE", "1")
    )
    if use_nccl:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend="nccl" if use_nccl else "gloo")
    try:
        world, rank = dist.get_world_size(), dist.get_rank()
        generator = torch.Generator().manual_seed(seed)  # same batch on every rank
        images = torch.randn(world * local_batch, dim, generator=generator, dtype=torch.float64)
        texts = torch.randn(world * local_batch, dim, generator=generator, dtype=torch.float64)
        images, texts = images.to(device), texts.to(device)
        rows = slice(rank * local_batch, (rank + 1) * local_batch)

        # distributed: this rank's slice, local loss + gather with grad
        x = images[rows].clone().requires_grad_()
        y = texts[rows].clone().requires_grad_()
        loss = distributed_info_nce_loss(x, y)
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world  # what one logs: the average of the rank losses
        grad_x = gather_with_grad(x.grad / world)  # DDP-averaged, all ranks' slices  [N, D]
        grad_y = gather_with_grad(y.grad / world)

        # single process on the concatenated batch
        full_x, full_y = images.clone().requires_grad_(), texts.clone().requires_grad_()
        reference = info_nce_loss(full_x, full_y)
        reference.backward()
        reference = reference.detach()
        loss_diff = abs(float(mean_loss) - float(reference))
        grad_diff = max(
            float((grad_x - full_x.grad).abs().max()), float((grad_y - full_y.grad).abs().max())
        )
        ok = loss_diff < 1e-10 and grad_diff < 1e-10
        if rank == 0:
            backend = dist.get_backend()
            print(f"world size {world} ({backend}), local batch {local_batch}, ", end="")
            print(f"global batch {world * local_batch}")
            print(f"mean of rank losses     {float(mean_loss):.12f}")
            print(f"single-process loss     {float(reference):.12f}")
            print(f"|loss difference|       {loss_diff:.3e}")
            print(f"max |grad difference|   {grad_diff:.3e}  (per-rank grads / world size)")
            print("OK" if ok else "MISMATCH")
        return 0 if ok else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(_demo())
