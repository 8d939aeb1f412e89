"""Contrastive image-text losses: CLIP's symmetric InfoNCE and SigLIP's sigmoid loss (3.1).

Both losses compare every image of a batch with every caption of the batch. With
L2-normalised features ``x_i`` (images) and ``y_j`` (texts) and a scale ``s = 1/τ``:

* InfoNCE (CLIP, Radford et al. 2021, eq. in Fig. 3 of the paper)::

      S_ij = s · x_i·y_j                                  # [N, N] logits
      L    = ½ [ CE(S, arange N) + CE(Sᵀ, arange N) ]

  Row i is an N-way classification "which caption belongs to image i", column j the same
  question for caption j. The diagonal holds the positives.
* SigLIP (Zhai et al. 2023, eq. 1)::

      L = −(1/N) Σ_ij log σ( z_ij (s · x_i·y_j + b) ),   z_ij = +1 if i = j else −1

  Every cell is an independent binary classification, so no softmax couples the batch.

``ClipLoss`` and ``SiglipLoss`` wrap them as modules with the learnable scale (and bias)
initialised as in the papers; ``ClipLoss.clamp_()`` keeps ``s <= 100`` as open_clip does.
The tiled, memory-efficient InfoNCE is in ``companion.losses.tiled``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from companion.losses.checks import (as_scalar, check_features, check_finite_scalar,
                                     check_positive_scalar)

__all__ = [
    "ClipLoss",
    "SiglipLoss",
    "contrastive_logits",
    "info_nce_loss",
    "multi_positive_targets",
    "siglip_loss",
]


def _check_positive_ids(positive_ids, n: int) -> torch.Tensor:
    """Return ``positive_ids`` as an integer tensor of shape [n] or raise."""
    if not isinstance(positive_ids, torch.Tensor):
        positive_ids = torch.as_tensor(positive_ids)
    if positive_ids.shape != (n,):
        raise ValueError(
            f"positive_ids must have shape ({n},) (one caption/group id per example), got "
            f"{tuple(positive_ids.shape)}"
        )
    if (
        positive_ids.is_floating_point()
        or positive_ids.is_complex()
        or positive_ids.dtype == torch.bool
    ):
        raise TypeError(f"positive_ids must be an integer tensor, got {positive_ids.dtype}")
    return positive_ids


# ---------------------------------------------------------------------------------------
# InfoNCE (CLIP)
# ---------------------------------------------------------------------------------------


def contrastive_logits(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    temperature: float | torch.Tensor = 0.07,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """The [N, N] logit matrix ``S_ij = x_i·y_j / τ`` of CLIP (Radford et al. 2021).

    Args:
        image_features: [N, D] image embeddings ``x``.
        text_features: [N, D] text embeddings ``y``; row i is the caption of image i.
        temperature: τ > 0, a float or a 0-d tensor (may require grad).
        normalize: L2-normalise the rows first (cosine similarity). ``False`` keeps raw dot
            products, whose scale grows with the feature norm.

    Returns:
        [N, N] logits; row i scores image i against every caption.
    """
    check_features(image_features, text_features)
    check_positive_scalar(temperature, "temperature")
    return _logits(image_features, text_features, as_scalar(temperature), normalize)


def _logits(x: torch.Tensor, y: torch.Tensor, temperature, normalize: bool) -> torch.Tensor:
    """Unchecked ``contrastive_logits``."""
    if normalize:
        x = F.normalize(x, dim=1)  # [N, D], rows of unit length
        y = F.normalize(y, dim=1)  # [N, D]
    return x @ y.T / temperature  # [N, N]


def multi_positive_targets(positive_ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Soft targets [N, N]: row i spreads probability 1 uniformly over all j with the same id.

    ``T_ij = [id_i = id_j] / #{k : id_k = id_i}``. The relation is symmetric, so the same
    matrix serves the image->text rows and the text->image rows. With all ids distinct it
    is the identity, i.e. the usual ``arange(N)`` labels.
    """
    same = positive_ids[:, None] == positive_ids[None, :]  # [N, N] bool, diagonal True
    same = same.to(dtype)
    return same / same.sum(dim=1, keepdim=True)  # [N, N], rows sum to 1


def info_nce_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    temperature: float | torch.Tensor = 0.07,
    *,
    normalize: bool = True,
    positive_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE loss of CLIP (Radford et al. 2021; van den Oord et al. 2018).

    ``S = x·yᵀ / τ`` on L2-normalised rows, ``L = ½ [CE(S, arange N) + CE(Sᵀ, arange N)]``.

    Args:
        image_features: [N, D] image embeddings.
        text_features: [N, D] text embeddings; row i is the caption of image i.
        temperature: τ > 0, a float or a 0-d tensor that may require grad (learnable).
        normalize: L2-normalise the rows first (``False`` shows why it matters).
        positive_ids: optional [N] integer caption/group ids. Rows with equal ids are all
            positives of each other: the target of row i is spread uniformly over them
            (multi-positive soft-target cross-entropy, ``multi_positive_targets``), so a
            duplicate caption is no longer pushed away as a false negative. With all ids
            distinct the loss is exactly the plain one.

    Returns:
        The scalar loss (mean over the 2N classification problems).
    """
    check_features(image_features, text_features)
    check_positive_scalar(temperature, "temperature")
    n = image_features.shape[0]
    logits = _logits(image_features, text_features, as_scalar(temperature), normalize)  # [N, N]
    if positive_ids is None:
        labels = torch.arange(n, device=logits.device)  # [N], the diagonal
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    positive_ids = _check_positive_ids(positive_ids, n).to(logits.device)
    targets = multi_positive_targets(positive_ids, dtype=logits.dtype)  # [N, N], symmetric
    # soft-target CE: −Σ_j T_ij log softmax(S)_ij, averaged over rows (and over columns)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class ClipLoss(nn.Module):
    """InfoNCE with CLIP's learnable temperature, stored as ``logit_scale = log(1/τ)``.

    The scale ``s = exp(logit_scale)`` starts at ``1/temperature`` (1/0.07 ≈ 14.3, CLIP) and
    is clamped to ``s <= max_scale`` (100) in ``forward``. Call ``clamp_()`` after each
    optimiser step, as open_clip does, so the parameter itself stays in ``[0, ln max_scale]``
    and does not drift where the forward clamp would stop its gradient. ``normalize`` is passed
    to ``info_nce_loss`` (``False`` shows what skipping the L2 normalisation does).
    """

    def __init__(self, temperature: float = 0.07, max_scale: float = 100.0, normalize: bool = True):
        super().__init__()
        self.normalize = normalize
        check_positive_scalar(temperature, "temperature")
        check_positive_scalar(max_scale, "max_scale")
        if max_scale < 1:
            raise ValueError(
                f"max_scale must be >= 1 (scale range [1, max_scale]), got {max_scale}"
            )
        self.max_scale = float(max_scale)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    @property
    def scale(self) -> torch.Tensor:
        """The effective scale ``min(exp(logit_scale), max_scale)`` (0-d, differentiable)."""
        return self.logit_scale.exp().clamp(max=self.max_scale)

    @property
    def temperature(self) -> float:
        """The effective temperature ``1/scale`` as a Python float (for logging)."""
        return 1.0 / float(self.scale.detach())

    @torch.no_grad()
    def clamp_(self) -> ClipLoss:
        """Clamp ``logit_scale`` in place to ``[0, ln max_scale]`` (open_clip: after each step)."""
        self.logit_scale.clamp_(0.0, math.log(self.max_scale))
        return self

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        positive_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of [N, D] image and text features (see ``info_nce_loss``).

        Under ``torchrun`` (a process group of more than one rank) the features are this
        rank's share and the loss is ``distributed_info_nce_loss``: local rows against the
        columns gathered from every rank, so W ranks see W times the negatives of one.
        """
        if torch.distributed.is_available() and torch.distributed.is_initialized() and (
                torch.distributed.get_world_size() > 1):
            # companion.distributed builds on this module's info_nce_loss: the one import
            # that points back, taken only under torchrun
            from companion.distributed import distributed_info_nce_loss

            if positive_ids is not None:
                raise ValueError("multi-positive targets (positive_ids) are not gathered "
                                 "across ranks; train the multi-positive loss in one process")
            return distributed_info_nce_loss(image_features, text_features, 1.0 / self.scale,
                                             normalize=self.normalize)
        return info_nce_loss(
            image_features,
            text_features,
            1.0 / self.scale,
            normalize=self.normalize,
            positive_ids=positive_ids,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:.4g}, max_scale={self.max_scale:g}"


# ---------------------------------------------------------------------------------------
# SigLIP
# ---------------------------------------------------------------------------------------


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """Pairwise sigmoid loss of SigLIP (Zhai et al. 2023, eq. 1 / Algorithm 1).

    ``L = −(1/N) Σ_ij log σ(z_ij (s·x_i·y_j + b))`` with ``z_ij = +1`` on the diagonal and
    ``−1`` elsewhere.

    Args:
        image_features: [N, D] image embeddings ``x``.
        text_features: [N, D] text embeddings ``y``; row i is the caption of image i.
        logit_scale: the multiplier ``s > 0`` itself (already exponentiated, as open_clip
            passes it), float or 0-d tensor.
        logit_bias: the bias ``b``, float or 0-d tensor (SigLIP starts at −10 so that the
            N² − N negatives do not dominate the first steps).
        normalize: L2-normalise the rows first.

    Returns:
        The scalar loss (sum over the N² cells divided by N, as in the paper).
    """
    check_features(image_features, text_features)
    check_positive_scalar(logit_scale, "logit_scale")
    check_finite_scalar(logit_bias, "logit_bias")
    x, y = image_features, text_features
    if normalize:
        x = F.normalize(x, dim=1)  # [N, D]
        y = F.normalize(y, dim=1)  # [N, D]
    n = x.shape[0]
    logits = as_scalar(logit_scale) * (x @ y.T) + as_scalar(logit_bias)  # [N, N]
    signs = 2 * torch.eye(n, dtype=logits.dtype, device=logits.device) - 1  # [N, N], z_ij
    return -F.logsigmoid(signs * logits).sum() / n


class SiglipLoss(nn.Module):
    """SigLIP loss with a learnable log-scale (init ``log 10``) and bias (init −10)."""

    def __init__(self, scale: float = 10.0, bias: float = -10.0):
        super().__init__()
        check_positive_scalar(scale, "scale")
        check_finite_scalar(bias, "bias")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(bias)))

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Loss of [N, D] image and text features (see ``siglip_loss``)."""
        return siglip_loss(image_features, text_features, self.logit_scale.exp(), self.logit_bias)

    def extra_repr(self) -> str:
        return f"scale={float(self.logit_scale.exp()):.4g}, bias={float(self.logit_bias):.4g}"
