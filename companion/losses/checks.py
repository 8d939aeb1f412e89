"""Argument checks shared by the losses: feature matrices and scalar parameters.

Every loss of ``companion.losses`` (and ``companion.distributed``) validates its inputs
with these, so a wrong shape, dtype, device or a NaN gives one clear message wherever it
enters.
"""

from __future__ import annotations

import math

import torch

__all__ = ["as_scalar", "check_features", "check_finite_scalar", "check_positive_scalar",
           "scalar_value"]


def check_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    names: tuple[str, str] = ("image_features", "text_features"),
) -> None:
    """Raise a clear error unless both are finite floating [N, D] tensors of equal shape."""
    for name, x in zip(names, (image_features, text_features)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor of shape [N, D], got {type(x).__name__}"
            )
        if x.ndim != 2:
            raise ValueError(
                f"{name} must be 2-D [N, D] (one feature row per example), got shape "
                f"{tuple(x.shape)}; flatten or pool the features first"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"{name} must have a floating dtype, got {x.dtype}; call .float() on it"
            )
    (n_img, d_img), (n_txt, d_txt) = image_features.shape, text_features.shape
    if n_img != n_txt:
        raise ValueError(
            f"{names[0]} has N={n_img} rows but {names[1]} has N={n_txt}; the losses pair "
            "row i of one with row i of the other, so pass equally long batches"
        )
    if d_img != d_txt:
        raise ValueError(
            f"{names[0]} has D={d_img} but {names[1]} has D={d_txt}; project both into the "
            "same embedding dimension before the loss"
        )
    if image_features.device != text_features.device:
        raise ValueError(
            f"{names[0]} is on {image_features.device} but {names[1]} is on "
            f"{text_features.device}; move both to the same device"
        )
    if n_img == 0:
        raise ValueError(
            f"empty batch: {names[0]} has shape {tuple(image_features.shape)}; N must be >= 1"
        )
    for name, x in zip(names, (image_features, text_features)):
        finite_rows = torch.isfinite(x).all(dim=1)  # [N]
        if not bool(finite_rows.all()):
            k = int((~finite_rows).nonzero()[0, 0])
            raise ValueError(
                f"{name} contains NaN/inf at row {k}; check the encoder outputs (fp16 overflow?)"
            )


def scalar_value(value, name: str) -> float:
    """``value`` (a Python float or a 1-element tensor) as a float; TypeError otherwise."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a scalar (0-d tensor), got shape {tuple(value.shape)}"
            )
        return float(value.detach())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(value).__name__}")


def check_positive_scalar(value, name: str) -> None:
    """Raise unless ``value`` is a finite number > 0 (a Python float or a 1-element tensor)."""
    number = scalar_value(value, name)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be finite and > 0, got {number}")


def check_finite_scalar(value, name: str) -> None:
    """Raise unless ``value`` is a finite number (a Python float or a 1-element tensor)."""
    number = scalar_value(value, name)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")


def as_scalar(value) -> torch.Tensor | float:
    """A 1-element tensor as a 0-d tensor (keeps autograd); Python numbers unchanged."""
    return value.reshape(()) if isinstance(value, torch.Tensor) else float(value)
