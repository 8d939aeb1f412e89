"""The vision-token probe of section 3.2: labels, the tokens the LM receives, the probe's
fit, and descriptions scored cell by cell."""

import pytest
import torch

from companion.clip import pixel_values_for
from companion.models import TinyClipConfig, build_clip
from companion.probe import (IGNORE, PROBE_ATTRIBUTES, cell_groups, cell_labels, described_cells,
                             description_cell_accuracy, probe_accuracy, train_probe,
                             vision_tokens)
from companion.tokenizer import train_tokenizer, world_corpus
from companion.lm import TinyLMConfig, build_lm
from companion.vlm import build_vlm
from companion.world import (COLORS, REGIONS, SHAPES, Scene, SceneObject, canonical_caption,
                             make_scenes, render_scene)

SCENE = Scene(7, (SceneObject("triangle", "blue", "small", "top right", (0.7, 0.05, 0.85, 0.2)),
                  SceneObject("circle", "red", "large", "center", (0.36, 0.36, 0.63, 0.63))),
              word="CAT", word_region="bottom left")


def test_cell_labels_of_a_hand_built_scene():
    labels = cell_labels([SCENE])
    expected = torch.full((1, 9, 4), IGNORE)
    expected[..., 0] = 0  # no object: the word's cell too
    expected[0, REGIONS.index("top right")] = torch.tensor(
        [1, SHAPES.index("triangle"), list(COLORS).index("blue"), 0])
    expected[0, REGIONS.index("center")] = torch.tensor(
        [1, SHAPES.index("circle"), list(COLORS).index("red"), 1])
    assert torch.equal(labels, expected)


def test_cell_groups_gather_each_cells_patches_in_reading_order():
    # a 6 x 6 patch grid, each token holding its own (row, column)
    rows, columns = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    tokens = torch.stack([rows, columns], dim=-1).reshape(1, 36, 2).float()
    groups = cell_groups(tokens)
    assert groups.shape == (1, 9, 8)
    # cell 5 ("right") is patch rows 2-3, columns 4-5, read row by row
    assert groups[0, 5].tolist() == [2, 4, 2, 5, 3, 4, 3, 5]
    assert groups[0, 0].tolist() == [0, 0, 0, 1, 1, 0, 1, 1]
    with pytest.raises(ValueError, match="square grid"):
        cell_groups(torch.zeros(1, 16, 2))  # 4 x 4 patches: a cell would split patches
    with pytest.raises(ValueError, match="square grid"):
        cell_groups(torch.zeros(1, 35, 2))


def test_canonical_descriptions_score_one_everywhere():
    scenes = make_scenes(40, seed=5)
    scores = description_cell_accuracy(scenes, [canonical_caption(s) for s in scenes])
    assert scores == {name: 1.0 for name in PROBE_ATTRIBUTES + ("whole scene",)}
    assert described_cells(canonical_caption(SCENE)) == {
        "top right": {"shape": "triangle", "color": "blue", "size": "small"},
        "center": {"shape": "circle", "color": "red", "size": "large"}}


def test_wrong_and_missing_objects_are_counted_cell_by_cell():
    right = "a small blue triangle at the top right and a large red circle at the center."
    wrong_shape = "a small blue square at the top right and a large red circle at the center."
    missing = "a large red circle at the center."
    extra = right[:-1] + " and a small green diamond at the left."
    scores = description_cell_accuracy([SCENE] * 4, [right, wrong_shape, missing, extra])
    # 8 object cells (2 per scene): the wrong shape and the missing triangle cost one each
    assert scores["shape"] == pytest.approx(6 / 8)
    assert scores["color"] == pytest.approx(7 / 8)
    assert scores["size"] == pytest.approx(7 / 8)
    # 36 cells: the missing triangle and the invented diamond are one wrong cell each
    assert scores["object"] == pytest.approx(34 / 36)
    assert scores["whole scene"] == pytest.approx(1 / 4)


def test_described_cells_skips_phrases_without_one_region():
    assert described_cells("a red circle next to a blue square at the top.") == {}
    assert described_cells("a red circle.") == {}
    assert described_cells("a circle at the top.") == {"top": {"shape": "circle"}}
    assert described_cells("no triangles at the left.") == {}
    assert described_cells("") == {}


def _separable(n, seed):
    """Features that encode the labels (one-hot per cell and attribute) plus noise."""
    scenes = make_scenes(n, seed=seed)
    labels = cell_labels(scenes)
    sizes = [2, len(SHAPES), len(COLORS), 2]
    parts = [torch.nn.functional.one_hot(labels[..., k].clamp(min=0), s).float()
             * (labels[..., k:k + 1] != IGNORE) for k, s in enumerate(sizes)]
    features = torch.cat(parts, dim=-1)  # (N, 9 cells as 9 tokens, 14)
    generator = torch.Generator().manual_seed(seed)
    return features + 0.1 * torch.randn(features.shape, generator=generator), labels


def test_probe_reads_what_the_features_carry_and_not_more():
    features, labels = _separable(2000, seed=1)
    test_features, test_labels = _separable(200, seed=2)
    run = train_probe(features, labels, steps=800, hidden=256, lr=3e-3)
    scores = probe_accuracy(run.probe, test_features, test_labels)
    assert min(scores.values()) == 1.0
    assert run.losses[-1] < 0.1 * run.losses[0]
    # features that say nothing about the scene: shapes (4 classes) stay near chance
    noise = torch.randn(features.shape, generator=torch.Generator().manual_seed(3))
    blind = train_probe(noise, labels, steps=800, hidden=256, lr=3e-3)
    assert probe_accuracy(blind.probe, test_features, test_labels)["shape"] < 0.45


def test_probe_is_deterministic_in_its_seed():
    features, labels = _separable(100, seed=1)
    a = train_probe(features, labels, steps=20, hidden=16, seed=4)
    b = train_probe(features, labels, steps=20, hidden=16, seed=4)
    assert a.losses == b.losses


def test_vision_tokens_are_what_the_lm_receives():
    tokenizer = train_tokenizer(world_corpus(40, seed=1), vocab_size=400)
    clip, processor, _ = build_clip(tokenizer, seed=0, sizes=TinyClipConfig(
        image_size=16, patch_size=8, vision_width=32, vision_layers=2, text_width=32,
        text_layers=1, heads=2, projection_dim=16))
    lm, _ = build_lm(tokenizer, sizes=TinyLMConfig(hidden_size=32, layers=1, heads=2,
                                                    intermediate_size=64), seed=0)
    vlm = build_vlm(clip, lm, tokenizer).eval()
    pixels = pixel_values_for(processor, [render_scene(s, 16) for s in make_scenes(3, seed=0)])
    seen = []
    handle = vlm.model.multi_modal_projector.register_forward_hook(
        lambda module, args, out: seen.append(out.detach()))
    ids = torch.tensor([[vlm.config.image_token_index] * 4 + [5]] * 3)
    with torch.no_grad():
        vlm(input_ids=ids, pixel_values=pixels)
    handle.remove()
    tokens = vision_tokens(vlm, pixels, batch_size=2)
    assert tokens.shape == (3, 4, 32)
    assert torch.allclose(tokens, seen[0].reshape(3, 4, 32))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        vision_tokens(vlm, pixels[0])


def test_bad_shapes_are_errors():
    features, labels = _separable(10, seed=1)
    with pytest.raises(ValueError, match="tokens, width"):
        train_probe(features.flatten(1), labels)
    with pytest.raises(ValueError, match="9 cells, 4"):
        train_probe(features, labels[..., :3])
    with pytest.raises(ValueError, match="one per scene"):
        train_probe(features[:5], labels)
    with pytest.raises(ValueError, match="must be positive"):
        train_probe(features, labels, steps=0)
    with pytest.raises(ValueError, match="meant for small models"):
        train_probe(torch.zeros(1, 48 * 48, 4096), torch.zeros(1, 9, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="one description per scene"):
        description_cell_accuracy([SCENE], [])
