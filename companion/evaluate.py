"""Evaluation shared by the chapters: retrieval recall@k and zero-shot classification."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def recall_at_k(
    similarity: torch.Tensor,
    query_groups: Sequence[int] | torch.Tensor,
    candidate_groups: Sequence[int] | torch.Tensor,
    ks: Sequence[int] = (1, 5),
) -> dict[int, float]:
    """Share of queries whose top-k candidates contain one of the same group.

    similarity: (Q, C) scores, higher is better; groups: (Q,) and (C,) integer ids. A
    retrieved candidate counts as correct when its group equals the query's: in the shapes
    world, the group is the scene's description, so any caption of the same scene (or of an
    identical scene) is a hit.
    """
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be (Q, C), got shape {tuple(similarity.shape)}")
    query_groups = torch.as_tensor(query_groups, device=similarity.device)
    candidate_groups = torch.as_tensor(candidate_groups, device=similarity.device)
    if query_groups.shape != (similarity.shape[0],) or candidate_groups.shape != (similarity.shape[1],):
        raise ValueError(
            f"groups must have shapes ({similarity.shape[0]},) and ({similarity.shape[1]},), got "
            f"{tuple(query_groups.shape)} and {tuple(candidate_groups.shape)}")
    results = {}
    for k in ks:
        k_eff = min(k, similarity.shape[1])
        top = similarity.topk(k_eff, dim=1).indices                     # [Q, k]
        hit = (candidate_groups[top] == query_groups[:, None]).any(dim=1)  # [Q]
        results[k] = hit.float().mean().item()
    return results


def retrieval_metrics(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    image_groups: Sequence[int] | torch.Tensor,
    text_groups: Sequence[int] | torch.Tensor,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Image→text and text→image recall@k on cosine similarity.

    Returns ``{"i2t_R@1": ..., "i2t_R@5": ..., "t2i_R@1": ..., "t2i_R@5": ...}``.
    """
    image_embeddings = F.normalize(image_embeddings.float(), dim=-1)  # [I, D]
    text_embeddings = F.normalize(text_embeddings.float(), dim=-1)    # [T, D]
    similarity = image_embeddings @ text_embeddings.T                 # [I, T]
    out = {}
    for k, value in recall_at_k(similarity, image_groups, text_groups, ks).items():
        out[f"i2t_R@{k}"] = value
    for k, value in recall_at_k(similarity.T, text_groups, image_groups, ks).items():
        out[f"t2i_R@{k}"] = value
    return out


def zero_shot_classify(
    image_embeddings: torch.Tensor, class_text_embeddings: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """Predicted class per image from text prompts.

    image_embeddings: (N, D); class_text_embeddings: (C, P, D) with P prompts per class, or
    (C, D). ``reduction="mean"`` averages each class's normalised prompt embeddings (CLIP's
    prompt ensembling over its 80 templates); ``"max"`` scores a class by its best prompt.
    """
    images = F.normalize(image_embeddings.float(), dim=-1)            # [N, D]
    if class_text_embeddings.ndim == 2:
        class_text_embeddings = class_text_embeddings[:, None]        # [C, 1, D]
    prompts = F.normalize(class_text_embeddings.float(), dim=-1)      # [C, P, D]
    if reduction == "mean":
        classes = F.normalize(prompts.mean(dim=1), dim=-1)            # [C, D]
        return (images @ classes.T).argmax(dim=1)                      # [N]
    if reduction == "max":
        scores = torch.einsum("nd,cpd->ncp", images, prompts)          # [N, C, P]
        return scores.amax(dim=2).argmax(dim=1)                        # [N]
    raise ValueError(f"reduction={reduction!r}: use 'mean' or 'max'")
