"""Image-text matching (ITM): the seed's two-way head, its loss and negative mining (3.1).

ITM is a binary question about one (image, text) pair: "does this caption describe this
image?" A fused image-text encoder reads both together; the head classifies its [CLS]
output into 0 = no match, 1 = match. This module holds what the paradigm itself adds:

* ``ITMHead``: exactly the seed's head, ``nn.Linear(hidden_dim, 2)`` on position 0;
* ``itm_loss``: two-way cross-entropy;
* ``sample_hard_negatives`` / ``sample_random_negatives``: which wrong caption (or image) to
  pair with each example. Random negatives are mostly easy (a caption of a completely
  different scene); BLIP (Li et al. 2022, sec. 3.2) draws each negative with probability
  ``softmax(sim_i)`` over the contrastive similarities of the batch, so captions that the
  contrastive model confuses with the positive are chosen most often.

The sampler never picks an excluded column (the positive and every caption that is also
true of the image), works in log-space so large similarities cannot overflow, and raises
instead of sampling from a row with NaN (``torch.multinomial`` fails on such rows in BLIP's
code, BLIP #76).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ITMHead",
    "itm_loss",
    "sample_hard_negatives",
    "sample_random_negatives",
]


class ITMHead(nn.Module):
    """The seed's ITM head: a linear two-way classifier on the fused [CLS] output.

    ``forward(multimodal_features)`` takes ``(B, L, hidden_dim)`` hidden states of a fused
    image-text encoder and returns ``(B, 2)`` logits (column 1 = match) from position 0.
    """

    def __init__(self, hidden_dim: int):
        super().__init__()
        if isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 1:
            raise ValueError(f"ITMHead(hidden_dim={hidden_dim!r}): hidden_dim must be a positive "
                             "integer, the width of the fused encoder's hidden states")
        self.hidden_dim = hidden_dim
        self.classifier = nn.Linear(hidden_dim, 2)

    def forward(self, multimodal_features: torch.Tensor) -> torch.Tensor:
        if not isinstance(multimodal_features, torch.Tensor):
            raise TypeError("ITMHead expects a tensor of shape (B, L, hidden_dim), got "
                            f"{type(multimodal_features).__name__}")
        if multimodal_features.ndim != 3 or multimodal_features.shape[-1] != self.hidden_dim:
            raise ValueError(
                f"ITMHead expects fused hidden states of shape (B, L, {self.hidden_dim}) "
                f"(batch, sequence, hidden), got {tuple(multimodal_features.shape)}; pass the "
                "encoder's last_hidden_state, not its pooled output")
        if multimodal_features.shape[1] == 0:
            raise ValueError("ITMHead got an empty sequence (L = 0); the [CLS] token at "
                             "position 0 is missing")
        cls_output = multimodal_features[:, 0]   # [B, hidden], the [CLS] position
        return self.classifier(cls_output)       # [B, 2]

    def extra_repr(self) -> str:
        return f"hidden_dim={self.hidden_dim}"


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Two-way cross-entropy of ITM logits ``(B, 2)`` against labels ``(B,)``: 1 match, 0 not."""
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("itm_loss expects tensors: logits (B, 2) and labels (B,)")
    if logits.ndim != 2 or logits.shape[1] != 2:
        raise ValueError(f"itm_loss: logits must have shape (B, 2) (no match, match), got "
                         f"{tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"itm_loss: logits must be floating point, got {logits.dtype}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"itm_loss: labels must have shape ({logits.shape[0]},), one per row "
                         f"of logits, got {tuple(labels.shape)}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"itm_loss: labels must be integers 0 (no match) or 1 (match), got "
                        f"dtype {labels.dtype}; call .long() on them")
    if logits.shape[0] == 0:
        raise ValueError("itm_loss got an empty batch")
    bad = (labels != 0) & (labels != 1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"itm_loss: labels must be 0 or 1, got {int(labels[row])} at row {row}")
    return F.cross_entropy(logits.float(), labels.to(logits.device).long())


# ----------------------------------------------------------------------------- negatives

def _check_exclude(exclude, shape, where: str) -> torch.Tensor:
    if not isinstance(exclude, torch.Tensor) or exclude.dtype != torch.bool:
        got = exclude.dtype if isinstance(exclude, torch.Tensor) else type(exclude).__name__
        raise TypeError(f"{where}: exclude must be a bool tensor of shape {tuple(shape)} "
                        f"(True = never pick), got {got}")
    if tuple(exclude.shape) != tuple(shape):
        raise ValueError(f"{where}: exclude has shape {tuple(exclude.shape)} but must have "
                         f"shape {tuple(shape)}, one flag per candidate")
    return exclude


def _sample_rows(log_weights: torch.Tensor, exclude: torch.Tensor,
                 generator: torch.Generator | None, where: str) -> torch.Tensor:
    """One column per row with probability ∝ exp(log_weights) over the eligible columns.

    Inverse-CDF sampling in float64: a column with weight exactly 0 (excluded, or
    underflowed) can never be returned, because the first index whose cumulative weight
    exceeds ``u ∈ [0, total)`` always carries positive weight.
    """
    rows, columns = log_weights.shape
    eligible = ~exclude                                               # [B, M]
    empty = ~eligible.any(dim=1)                                      # [B]
    if bool(empty.any()):
        row = int(empty.nonzero()[0, 0])
        raise ValueError(f"{where}: row {row} has no eligible column (all {columns} are "
                         "excluded); a batch needs at least one caption/image that is false "
                         "for every example: use a larger batch or fewer identical scenes")
    values = log_weights.detach().to(torch.float64)
    broken = (~torch.isfinite(values) & eligible).any(dim=1)          # [B]
    if bool(broken.any()):
        row = int(broken.nonzero()[0, 0])
        col = int((~torch.isfinite(values[row]) & eligible[row]).nonzero()[0, 0])
        raise ValueError(f"{where}: row {row} has a non-finite similarity "
                         f"({values[row, col].item()}) at eligible column {col}; check the "
                         "embeddings (fp16 overflow?) or exclude that column")
    values = values.masked_fill(exclude, float("-inf"))              # [B, M]
    values = values - values.amax(dim=1, keepdim=True)                # max 0: no overflow
    weights = values.exp()                                            # [B, M], 0 if excluded
    cumulative = weights.cumsum(dim=1)                                # [B, M]
    total = cumulative[:, -1:]                                        # [B, 1], >= 1
    device = log_weights.device
    uniform = torch.rand(rows, 1, generator=generator, dtype=torch.float64,
                         device=generator.device if generator is not None else device)
    u = uniform.to(device) * total                                    # [B, 1] in [0, total)
    picked = torch.searchsorted(cumulative, u, right=True).squeeze(1)  # first cum > u
    # u rounded up to total (probability ~1e-16): take the last eligible column instead
    last = columns - 1 - eligible.flip(1).to(torch.int8).argmax(dim=1)
    picked = torch.where(picked >= columns, last, picked)
    return picked


def _default_exclude(similarity: torch.Tensor, where: str) -> torch.Tensor:
    rows, columns = similarity.shape
    if rows != columns:
        raise ValueError(f"{where}: similarity is {rows}×{columns}; without an exclude mask "
                         "the diagonal is the positive, which needs a square matrix. Pass "
                         "exclude (B, M) marking every positive")
    return torch.eye(rows, dtype=torch.bool, device=similarity.device)


def sample_hard_negatives(similarity: torch.Tensor, exclude: torch.Tensor | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """BLIP's hard-negative mining: for each row i of ``similarity`` (B, M), one column.

    Column j is drawn with probability ``softmax(similarity[i])_j`` renormalised over the
    eligible columns (``exclude[i, j]`` False), so captions the contrastive model finds
    close to image i are chosen most often. Pass similarities already divided by the
    temperature: the softmax reads them as logits.

    Args:
        similarity: (B, M) floating scores; row i scores example i against M candidates.
            Excluded cells may hold anything (even NaN); eligible cells must be finite.
        exclude: (B, M) bool, True where a column must never be picked: the positive and
            every candidate that is also true of example i (an identical caption, an
            identical scene). ``None`` excludes the diagonal (needs B == M).
        generator: a ``torch.Generator`` for reproducible draws.

    Returns:
        (B,) long tensor of column indices, never an excluded one.

    Raises:
        ValueError naming the row when a row has no eligible column or a non-finite value
        in an eligible column.
    """
    where = "sample_hard_negatives"
    if not isinstance(similarity, torch.Tensor) or similarity.ndim != 2:
        got = (tuple(similarity.shape) if isinstance(similarity, torch.Tensor)
               else type(similarity).__name__)
        raise ValueError(f"{where}: similarity must be a 2-D tensor (B, M), got {got}")
    if not similarity.is_floating_point():
        raise TypeError(f"{where}: similarity must be floating point, got {similarity.dtype}")
    if similarity.shape[0] == 0 or similarity.shape[1] == 0:
        raise ValueError(f"{where}: similarity is empty, shape {tuple(similarity.shape)}")
    if exclude is None:
        exclude = _default_exclude(similarity, where)
    exclude = _check_exclude(exclude, similarity.shape, where).to(similarity.device)
    return _sample_rows(similarity, exclude, generator, where)


def sample_random_negatives(exclude: torch.Tensor,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """One column per row of ``exclude`` (B, M), uniformly among the eligible (False) ones.

    The baseline of hard-negative mining: same exclusion contract as
    :func:`sample_hard_negatives`, but every eligible candidate is equally likely.
    """
    where = "sample_random_negatives"
    if isinstance(exclude, torch.Tensor) and exclude.ndim != 2:
        raise ValueError(f"{where}: exclude must be 2-D (B, M), got shape {tuple(exclude.shape)}")
    shape = exclude.shape if isinstance(exclude, torch.Tensor) else (0, 0)
    exclude = _check_exclude(exclude, shape, where)
    if exclude.shape[0] == 0 or exclude.shape[1] == 0:
        raise ValueError(f"{where}: exclude is empty, shape {tuple(exclude.shape)}")
    zeros = torch.zeros(exclude.shape, dtype=torch.float64, device=exclude.device)
    return _sample_rows(zeros, exclude, generator, where)
