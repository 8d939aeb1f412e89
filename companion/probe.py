"""What the vision tokens carry, against what the model says (section 3.2's diagnosis).

A *probe* is a small classifier trained on frozen features to read one fact out of them.
If a probe reads a fact from the vision tokens that the LM receives, the information
reached the LM, and an answer that gets the fact wrong is the LM's failure to use it; if
no probe can read it, the vision side lost it first.

Here each scene is a 3 × 3 grid of cells, and each cell covers whole patches of the vision
tower (2 × 2 of them in the default model). For every cell the probe reads that cell's
tokens and predicts whether it holds an object and, where it does, the object's shape,
colour and size; one MLP serves all nine cells. The model's
descriptions are scored cell by cell on the same four questions
(:func:`description_cell_accuracy`), so the two rows of figures compare like with like.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from companion.llava import merge_patches
from companion.world import COLORS, REGIONS, SHAPES, SIZES, described_objects, parse_answer

PROBE_ATTRIBUTES = ("object", "shape", "color", "size")
IGNORE = -100  # label of an attribute a cell does not have (no object there)
# first-layer weights of a CellProbe (LLaVA-1.5: 67 M); beyond, refuse
MAX_PROBE_WEIGHTS = 100_000_000


def _classes() -> dict[str, tuple]:
    return {"object": (False, True), "shape": SHAPES, "color": tuple(COLORS), "size": SIZES}


def cell_labels(scenes: Sequence) -> torch.Tensor:
    """(N, 9, 4) long: per scene and cell (``REGIONS`` order) whether it holds an object
    (0/1), and that object's shape, colour and size indices (``IGNORE`` without one).
    A word's cell counts as holding no object."""
    classes = _classes()
    labels = torch.full((len(scenes), len(REGIONS), len(PROBE_ATTRIBUTES)), IGNORE,
                        dtype=torch.long)
    labels[..., 0] = 0
    for n, scene in enumerate(scenes):
        for obj in scene.objects:
            labels[n, REGIONS.index(obj.region)] = torch.tensor(
                [1, classes["shape"].index(obj.shape), classes["color"].index(obj.color),
                 classes["size"].index(obj.size)])
    return labels


@torch.no_grad()
def vision_tokens(model, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, P, D): the vectors a ``LlavaForConditionalGeneration`` puts in place of the
    image's ``<image>`` tokens, from the model's own ``get_image_features`` (vision tower,
    its configured feature layer and selection strategy, then the projector), float32 on
    the CPU."""
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected "
                         "(N, 3, H, W)")
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(pixel_values), batch_size):
        out = model.model.get_image_features(
            pixel_values=pixel_values[start:start + batch_size].to(device),
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy)
        features = getattr(out, "pooler_output", out)  # an output object, or the features
        if isinstance(features, (list, tuple)):  # one (P, D) tensor per image
            features = torch.stack(list(features))
        chunks.append(features.float().cpu())
    return torch.cat(chunks)


def cell_groups(features: torch.Tensor, cells_per_side: int = 3) -> torch.Tensor:
    """(N, P, D) tokens of a square patch grid -> (N, cells, tokens per cell * D): the tokens
    of each cell of a ``cells_per_side`` × ``cells_per_side`` grid, concatenated in reading
    order. The patch grid's side must be a multiple of ``cells_per_side``."""
    n, tokens, width = features.shape
    side = round(tokens ** 0.5)
    if side * side != tokens or side % cells_per_side:
        raise ValueError(f"{tokens} vision tokens do not form a square grid whose side is a "
                         f"multiple of {cells_per_side}; the cell probe needs each scene cell "
                         "to cover whole patches")
    return merge_patches(features, side // cells_per_side)  # the projector's own merge


class CellProbe(nn.Module):
    """One MLP, shared by the 9 cells, from the tokens of a cell (its patches) to the logits
    of the four attributes there. Sharing it across cells is what a shape detector should be:
    a circle looks the same in every cell."""

    def __init__(self, tokens_per_cell: int, width: int, hidden: int = 256):
        super().__init__()
        self.sizes = [len(c) for c in _classes().values()]
        self.net = nn.Sequential(nn.LayerNorm(tokens_per_cell * width),
                                 nn.Linear(tokens_per_cell * width, hidden), nn.GELU(),
                                 nn.Linear(hidden, sum(self.sizes)))

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Per attribute, logits of shape (N, 9, classes) from (N, P, D) vision tokens."""
        return list(self.net(cell_groups(features)).split(self.sizes, dim=-1))


def _check(features: torch.Tensor, labels: torch.Tensor) -> None:
    if features.dim() != 3:
        raise ValueError(f"features have shape {tuple(features.shape)}; expected (N, tokens, "
                         "width), e.g. from vision_tokens")
    if labels.dim() != 3 or labels.shape[1:] != (9, len(PROBE_ATTRIBUTES)):
        raise ValueError(f"labels have shape {tuple(labels.shape)}; expected (N, 9 cells, "
                         f"{len(PROBE_ATTRIBUTES)}), e.g. from cell_labels")
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows but {len(labels)} label rows: one "
                         "per scene each")


def probe_loss(probe: CellProbe, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over attributes of the mean cross-entropy over the cells that have the attribute."""
    logits = probe(features)
    return sum(nn.functional.cross_entropy(logit.flatten(0, 1), labels[..., k].flatten(),
                                           ignore_index=IGNORE)
               for k, logit in enumerate(logits))


@dataclass
class ProbeRun:
    probe: CellProbe
    losses: list[float] = field(default_factory=list)


def train_probe(features: torch.Tensor, labels: torch.Tensor, steps: int = 600,
                batch_size: int = 128, lr: float = 1e-3, hidden: int = 256,
                seed: int = 0) -> ProbeRun:
    """Fit a :class:`CellProbe` to ``features`` (N, tokens, width) and ``labels``
    (N, cells, 4) with AdamW; deterministic in ``seed``."""
    _check(features, labels)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be positive")
    per_cell = cell_groups(features[:1]).shape[-1]
    if per_cell * hidden > MAX_PROBE_WEIGHTS:
        raise ValueError(f"a probe over {per_cell} inputs per cell with hidden={hidden} would "
                         f"have {per_cell * hidden / 1e6:.0f} M weights (limit "
                         f"{MAX_PROBE_WEIGHTS / 1e6:.0f} M): it is meant for small models; "
                         "skip it for a large checkpoint")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = CellProbe(per_cell // features.shape[2], features.shape[2], hidden)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.01)
    run = ProbeRun(probe)
    order = torch.randperm(len(features), generator=generator)
    position = 0
    for _ in range(steps):
        if position + batch_size > len(order):
            order, position = torch.randperm(len(features), generator=generator), 0
        rows = order[position:position + batch_size]
        position += batch_size
        loss = probe_loss(probe, features[rows], labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        run.losses.append(float(loss.detach()))
    probe.eval()
    return run


def _accuracies(predicted: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Per attribute: share of object cells (of all cells for ``object``) predicted right."""
    has_object = labels[..., 0] == 1
    out = {}
    for k, name in enumerate(PROBE_ATTRIBUTES):
        cells = torch.ones_like(has_object) if name == "object" else has_object
        out[name] = float((predicted[..., k] == labels[..., k])[cells].float().mean())
    right = (predicted == labels) | (labels == IGNORE)
    out["whole scene"] = float(right.flatten(1).all(dim=1).float().mean())
    return out


@torch.no_grad()
def probe_accuracy(probe: CellProbe, features: torch.Tensor, labels: torch.Tensor
                   ) -> dict[str, float]:
    """Accuracy per attribute (``object`` over every cell, the others over the cells that
    hold an object) and ``whole scene``: every cell of the scene entirely right."""
    _check(features, labels)
    predicted = torch.stack([logit.argmax(-1) for logit in probe(features)], dim=-1)
    return _accuracies(predicted, labels)


def described_cells(answer: str) -> dict[str, dict[str, str]]:
    """What a description says about each cell: ``{region: {"shape": ..., "color": ...,
    "size": ...}}`` for each mentioned object that has a region, by the attachment rule of
    :func:`companion.world.judge_description` (:func:`companion.world.described_objects`);
    unstated attributes are left out, a cell named twice keeps its first object."""
    cells: dict[str, dict[str, str]] = {}
    for stated in described_objects(parse_answer(answer)):
        region = stated.pop("region", None)
        if region is not None and region not in cells:
            cells[region] = stated
    return cells


def description_cell_accuracy(scenes: Sequence, answers: Sequence[str]) -> dict[str, float]:
    """The probe's four questions answered by free-text descriptions, one per scene: a cell
    holds an object when the description places one there, and an object's shape, colour
    or size is right when the description states that value at its cell (an object left
    out counts as wrong on all three)."""
    if len(scenes) != len(answers):
        raise ValueError(f"{len(scenes)} scenes but {len(answers)} descriptions: give one "
                         "description per scene")
    classes = _classes()
    labels = cell_labels(scenes)
    predicted = torch.full_like(labels, IGNORE)
    predicted[..., 0] = 0
    for n, answer in enumerate(answers):
        for region, stated in described_cells(answer).items():
            cell = REGIONS.index(region)
            predicted[n, cell, 0] = 1
            for k, name in enumerate(PROBE_ATTRIBUTES[1:], start=1):
                value = stated.get(name)
                if value in classes[name]:
                    predicted[n, cell, k] = classes[name].index(value)
    return _accuracies(predicted, labels)
