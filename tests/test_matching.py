"""Image-text matching: the seed's ITMHead, the ITM loss, negative mining, the fused model,
fine-grained negatives and re-ranking."""

from __future__ import annotations

import random
import re

import pytest
import torch
import torch.nn.functional as F

from companion.clip import build_caption_data, sample_batch, similarity_matrix
from companion.losses.matching import (ITMHead, itm_loss, sample_hard_negatives,
                                       sample_random_negatives)
from companion.matching import (CHANGES, FusionConfig, ITMModel, caption_truth,
                                evaluate_fine_grained, evaluate_itm, fine_grained_negative,
                                fine_grained_pairs, itm_batch, rerank, train_itm, true_pairs)
from companion.models import TinyClipConfig, build_clip
from companion.tokenizer import train_tokenizer
from companion.train import TrainConfig, train
from companion.world import (COLORS, REGIONS, SHAPES, SIZES, Scene, SceneObject,
                             canonical_caption, make_scenes, scene_captions)

torch.set_num_threads(1)

SIZES_CLIP = TinyClipConfig(image_size=16, patch_size=8, vision_width=32, vision_layers=1,
                            text_width=32, text_layers=1, heads=2, projection_dim=16)
FUSION = FusionConfig(hidden_size=32, layers=1, heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def tokenizer():
    scenes = make_scenes(60, seed=3)
    return train_tokenizer([c for s in scenes for c in scene_captions(s)], vocab_size=320)


@pytest.fixture(scope="module")
def clip(tokenizer):
    model, processor, _ = build_clip(tokenizer, sizes=SIZES_CLIP, seed=0)
    return model, processor


@pytest.fixture(scope="module")
def data(tokenizer, clip):
    return build_caption_data(make_scenes(24, seed=5), tokenizer, clip[1], render_size=32)


# ----------------------------------------------------------------------------- ITMHead, itm_loss

def test_itm_head_is_a_linear_layer_on_the_cls_position():
    torch.manual_seed(0)
    head = ITMHead(8)
    x = torch.randn(5, 7, 8)
    out = head(x)
    assert out.shape == (5, 2)
    torch.testing.assert_close(out, head.classifier(x[:, 0]))
    changed = x.clone()
    changed[:, 1:] = torch.randn(5, 6, 8)  # everything but [CLS]
    torch.testing.assert_close(head(changed), out)
    assert head(x[:, :1]).shape == (5, 2)


@pytest.mark.parametrize("shape, message", [
    ((5, 8), r"shape \(B, L, 8\).*got \(5, 8\)"),
    ((5, 3, 6), r"got \(5, 3, 6\)"),
    ((5, 0, 8), "empty sequence"),
])
def test_itm_head_rejects_bad_input(shape, message):
    with pytest.raises(ValueError, match=message):
        ITMHead(8)(torch.zeros(shape))


@pytest.mark.parametrize("hidden", [0, -3, 2.5, True])
def test_itm_head_needs_a_positive_width(hidden):
    with pytest.raises(ValueError, match="hidden_dim must be a positive integer"):
        ITMHead(hidden)


def test_itm_loss_is_two_way_cross_entropy():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.25], [-3.0, 4.0]], dtype=torch.float64)
    labels = torch.tensor([1, 0, 1])
    expected = sum(-torch.log_softmax(row, 0)[y] for row, y in zip(logits, labels)) / 3
    assert itm_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("logits, labels, error, message", [
    (torch.zeros(3, 3), torch.zeros(3, dtype=torch.long), ValueError, r"shape \(B, 2\)"),
    (torch.zeros(3, 2), torch.zeros(4, dtype=torch.long), ValueError, r"shape \(3,\)"),
    (torch.zeros(3, 2), torch.tensor([0, 2, 1]), ValueError, "got 2 at row 1"),
    (torch.zeros(3, 2), torch.tensor([0.0, 1.0, 1.0]), TypeError, "integers"),
    (torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, dtype=torch.long), TypeError, "floating"),
])
def test_itm_loss_rejects_bad_input(logits, labels, error, message):
    with pytest.raises(error, match=message):
        itm_loss(logits, labels)


# ----------------------------------------------------------------------------- negative mining

def _random_exclude(generator, rows, columns):
    exclude = torch.rand(rows, columns, generator=generator) < 0.6
    keep = torch.randint(columns, (rows,), generator=generator)
    exclude[torch.arange(rows), keep] = False  # at least one eligible column per row
    return exclude


def test_hard_negatives_never_pick_an_excluded_column():
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        rows, columns = 1 + trial % 9, 1 + (trial * 7) % 13
        similarity = torch.randn(rows, columns, generator=generator) * 20
        exclude = _random_exclude(generator, rows, columns)
        similarity[exclude] = 1e6  # excluded cells are the most similar: still never picked
        picked = sample_hard_negatives(similarity, exclude, generator)
        assert picked.shape == (rows,) and picked.dtype == torch.long
        assert not exclude[torch.arange(rows), picked].any()
        picked = sample_random_negatives(exclude, generator)
        assert not exclude[torch.arange(rows), picked].any()


def test_default_exclusion_is_the_diagonal():
    generator = torch.Generator().manual_seed(1)
    similarity = torch.eye(6) * 50  # the positives dominate every row
    for _ in range(50):
        picked = sample_hard_negatives(similarity, generator=generator)
        assert (picked != torch.arange(6)).all()
    with pytest.raises(ValueError, match="square matrix"):
        sample_hard_negatives(torch.zeros(3, 4))


def _chi_square(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
    expected = probabilities * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_equal_similarities_give_uniform_negatives():
    rows, columns = 20000, 5
    exclude = torch.zeros(rows, columns, dtype=torch.bool)
    exclude[:, 2] = True
    uniform = torch.tensor([0.25, 0.25, 0.25, 0.25])
    for similarity in (torch.full((rows, columns), 3.7), torch.full((rows, columns), -1e4)):
        picked = sample_hard_negatives(similarity, exclude, torch.Generator().manual_seed(2))
        counts = torch.bincount(picked, minlength=columns).double()
        assert counts[2] == 0
        # 3 degrees of freedom: P(chi² > 25) < 2e-5
        assert _chi_square(counts[[0, 1, 3, 4]], uniform.double()) < 25
    picked = sample_random_negatives(exclude, torch.Generator().manual_seed(3))
    counts = torch.bincount(picked, minlength=columns).double()
    assert counts[2] == 0 and _chi_square(counts[[0, 1, 3, 4]], uniform.double()) < 25


def test_hard_negatives_follow_the_softmax_of_the_eligible_columns():
    rows = 20000
    row = torch.tensor([2.0, 0.0, 1.0, 9.0, -1.0])
    exclude = torch.tensor([False, False, False, True, False]).expand(rows, -1).contiguous()
    picked = sample_hard_negatives(row.expand(rows, -1).contiguous(), exclude,
                                   torch.Generator().manual_seed(4))
    counts = torch.bincount(picked, minlength=5).double()
    eligible = torch.tensor([0, 1, 2, 4])
    expected = torch.softmax(row[eligible].double(), 0)  # renormalised without column 3
    assert counts[3] == 0
    assert _chi_square(counts[eligible], expected) < 25


def test_sampling_is_deterministic_given_a_generator():
    similarity = torch.randn(16, 16, generator=torch.Generator().manual_seed(5))
    a = sample_hard_negatives(similarity, generator=torch.Generator().manual_seed(9))
    b = sample_hard_negatives(similarity, generator=torch.Generator().manual_seed(9))
    c = sample_hard_negatives(similarity, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_non_finite_eligible_value_names_the_row():
    similarity = torch.zeros(5, 5)
    similarity[3, 1] = float("nan")
    with pytest.raises(ValueError, match="row 3 .*column 1"):
        sample_hard_negatives(similarity)
    similarity[3, 1] = float("inf")
    with pytest.raises(ValueError, match="row 3"):
        sample_hard_negatives(similarity)
    similarity[3, 1] = 0.0
    similarity[2, 2] = float("nan")  # on the excluded diagonal: ignored
    assert not (sample_hard_negatives(similarity) == torch.arange(5)).any()


def test_row_without_eligible_column_is_an_error():
    exclude = torch.zeros(4, 3, dtype=torch.bool)
    exclude[2] = True
    with pytest.raises(ValueError, match="row 2 has no eligible column"):
        sample_hard_negatives(torch.zeros(4, 3), exclude)
    with pytest.raises(ValueError, match="row 2 has no eligible column"):
        sample_random_negatives(exclude)
    with pytest.raises(ValueError, match="row 0 has no eligible column"):
        sample_hard_negatives(torch.zeros(1, 1))  # a batch of one has no negative


def test_huge_similarities_do_not_overflow():
    similarity = torch.tensor([[0.0, 3e38, 1e38, -3e38],
                               [5e4, 0.0, 4.9e4, -1e4]], dtype=torch.float32)
    exclude = torch.tensor([[True, False, False, False], [False, True, False, False]])
    for seed in range(20):
        picked = sample_hard_negatives(similarity, exclude, torch.Generator().manual_seed(seed))
        assert picked.tolist() == [1, 0]  # the others are exp(-1e38), exp(-1000): zero


@pytest.mark.parametrize("args, error, message", [
    ((torch.zeros(3),), ValueError, "2-D tensor"),
    ((torch.zeros(3, 3, dtype=torch.long),), TypeError, "floating point"),
    ((torch.zeros(3, 3), torch.zeros(3, 3)), TypeError, "bool tensor"),
    ((torch.zeros(3, 3), torch.zeros(3, 4, dtype=torch.bool)), ValueError, r"shape \(3, 3\)"),
    ((torch.zeros(0, 0),), ValueError, "empty"),
])
def test_hard_negative_argument_errors(args, error, message):
    with pytest.raises(error, match=message):
        sample_hard_negatives(*args)


# --------------------------------------------------------------------- fine-grained negatives

OBJECT = re.compile(r"a (small|large) (\w+) (\w+) at the ([a-z ]+?)(?=, | and |\.)")


def _facts(caption: str):
    """Objects (size, colour, shape, region) and the word sentence of a canonical caption."""
    head, _, word = caption.partition(". ")
    return sorted(OBJECT.findall(head + ".")), word


@pytest.mark.parametrize("change", CHANGES)
def test_fine_grained_negative_changes_exactly_one_fact(change):
    position = {"color": 1, "shape": 2, "size": 0, "position": 3}[change]
    allowed = {"color": COLORS, "shape": SHAPES, "size": SIZES, "position": REGIONS}[change]
    for scene in make_scenes(150, seed=11):
        rng = random.Random(scene.scene_id)
        caption, made = fine_grained_negative(scene, rng, change)
        assert made == change
        assert caption not in scene_captions(scene)  # false of the scene
        true_objects, true_word = _facts(canonical_caption(scene))
        false_objects, false_word = _facts(caption)
        assert len(true_objects) == len(scene.objects) == len(false_objects)
        assert false_word == true_word
        removed = [o for o in true_objects if o not in false_objects]
        added = [o for o in false_objects if o not in true_objects]
        assert len(removed) == len(added) == 1, (caption, canonical_caption(scene))
        (old,), (new,) = removed, added
        differ = [k for k in range(4) if old[k] != new[k]]
        assert differ == [position] and new[position] in allowed
        if change == "position":  # moved to a free cell
            taken = {o.region for o in scene.objects} | {scene.word_region}
            assert new[3] not in taken


def test_fine_grained_pairs_are_deterministic_and_balanced():
    scenes = make_scenes(40, seed=2)
    pairs = fine_grained_pairs(scenes, seed=1)
    assert pairs == fine_grained_pairs(scenes, seed=1)
    assert pairs != fine_grained_pairs(scenes, seed=2)
    assert [p[0] for p in pairs] == list(range(40))
    assert all(p[1] == canonical_caption(scenes[p[0]]) and p[2] != p[1] for p in pairs)
    assert {c: sum(p[3] == c for p in pairs) for c in CHANGES} == {c: 10 for c in CHANGES}


def test_fine_grained_negative_errors():
    scene = make_scenes(1, seed=0)[0]
    with pytest.raises(ValueError, match="change='count'"):
        fine_grained_negative(scene, random.Random(0), "count")
    with pytest.raises(TypeError, match="random.Random"):
        fine_grained_negative(scene, 0)
    full = Scene(0, tuple(SceneObject("circle", "red", "small", r, (0, 0, 0.1, 0.1))
                          for r in REGIONS[:8]), "CAT", REGIONS[8])
    with pytest.raises(ValueError, match="no free cell"):
        fine_grained_negative(full, random.Random(0), "position")


# ----------------------------------------------------------------------------- ITM batches

def test_itm_batch_layout(data):
    batch = sample_batch(data, 8, step=0, seed=0)
    out = itm_batch(batch, "random", generator=torch.Generator().manual_seed(0))
    assert out["labels"].tolist() == [1] * 8 + [0] * 16
    assert out["pixel_values"].shape == (24, *batch["pixel_values"].shape[1:])
    assert out["input_ids"].shape == out["attention_mask"].shape
    assert out["input_ids"].shape[0] == 24
    length = out["input_ids"].shape[1]
    rows = torch.arange(8)
    assert torch.equal(out["pixel_values"][:8], batch["pixel_values"])
    assert torch.equal(out["input_ids"][:8], batch["input_ids"][:, :length])
    assert torch.equal(out["pixel_values"][8:16], batch["pixel_values"])       # image i ...
    assert torch.equal(out["input_ids"][8:16], batch["input_ids"][out["negative_texts"], :length])
    assert torch.equal(out["pixel_values"][16:], batch["pixel_values"][out["negative_images"]])
    assert torch.equal(out["input_ids"][16:], batch["input_ids"][rows, :length])  # ... caption j
    assert (batch["attention_mask"][:, length:] == 0).all()  # only shared padding was cut


def _duplicate_batch(data):
    """A batch whose scenes repeat (identical groups) and whose captions repeat."""
    batch = sample_batch(data, 6, step=0, seed=0, phrasing="first")
    index = torch.tensor([0, 1, 0, 2, 1, 3, 4, 0])  # rows 0, 2 and 7 are the same pair
    return {key: value[index] for key, value in batch.items()}


def test_negatives_are_never_true_captions(data):
    batch = _duplicate_batch(data)
    same = true_pairs(batch)
    assert same[0, 2] and same[2, 7] and same[1, 4] and not same[0, 1]
    generator = torch.Generator().manual_seed(0)
    for negatives in ("random", "hard"):
        for _ in range(100):
            similarity = torch.randn(8, 8, generator=generator) * 5
            out = itm_batch(batch, negatives, similarity, generator)
            rows = torch.arange(8)
            assert not same[rows, out["negative_texts"]].any()
            assert not same[out["negative_images"], rows].any()


def test_truth_table_catches_position_free_captions(tokenizer, clip):
    """"a picture of a large red circle." is true of every scene with just that circle."""
    def circle(region):
        return SceneObject("circle", "red", "large", region, (0.0, 0.0, 0.1, 0.1))

    scenes = [Scene(0, (circle("top left"),)), Scene(1, (circle("center"),)),
              Scene(2, (SceneObject("square", "blue", "small", "left", (0, 0, 0.1, 0.1)),))]
    data = build_caption_data(scenes, tokenizer, clip[1], render_size=32)
    assert data.captions[1][4] == "a picture of a large red circle."
    which = torch.tensor([0, 4, 0])  # scene 1 with its position-free phrasing
    ids = data.input_ids[torch.arange(3), which]
    batch = {"pixel_values": data.pixel_values, "input_ids": ids,
             "attention_mask": data.attention_mask[torch.arange(3), which],
             "groups": data.groups, "caption_ids": torch.arange(3)}
    without = true_pairs(batch)
    with_truth = true_pairs(batch, caption_truth(data))
    assert not without[0, 1] and with_truth[0, 1]  # caption 1 is also true of image 0
    assert not with_truth[1, 0]                    # "... at the top left." is not true of 1
    assert torch.equal(with_truth & without, without)
    for seed in range(30):  # image 0's only possible negative caption is the square's
        out = itm_batch(batch, "random", generator=torch.Generator().manual_seed(seed),
                        truth=caption_truth(data))
        assert out["negative_texts"][0] == 2


def test_hard_negatives_come_from_the_similarity(data):
    batch = sample_batch(data, 6, step=1, seed=0, phrasing="first")
    similarity = torch.full((6, 6), -1e4)
    similarity[torch.arange(6), (torch.arange(6) + 1) % 6] = 1e4  # one obvious hardest caption
    similarity.fill_diagonal_(1e5)                                # positives: excluded anyway
    out = itm_batch(batch, "hard", similarity, torch.Generator().manual_seed(0))
    assert out["negative_texts"].tolist() == [(i + 1) % 6 for i in range(6)]
    assert out["negative_images"].tolist() == [(j - 1) % 6 for j in range(6)]


def test_itm_batch_anchors_use_the_whole_pool(data):
    pool = sample_batch(data, 12, step=2, seed=0)
    out = itm_batch(pool, "random", generator=torch.Generator().manual_seed(0), anchors=4)
    assert out["labels"].tolist() == [1] * 4 + [0] * 8
    assert out["negative_texts"].max() < 12
    assert (torch.cat([out["negative_texts"], out["negative_images"]]) >= 4).any()


def test_itm_batch_errors(data):
    batch = sample_batch(data, 4, step=0)
    with pytest.raises(ValueError, match="needs the batch's"):
        itm_batch(batch, "hard")
    with pytest.raises(ValueError, match=r"must be \(4, 4\)"):
        itm_batch(batch, "hard", torch.zeros(3, 3))
    with pytest.raises(ValueError, match="negatives='semi'"):
        itm_batch(batch, "semi")
    with pytest.raises(ValueError, match="anchors=5"):
        itm_batch(batch, anchors=5)
    with pytest.raises(KeyError, match="'groups'"):
        itm_batch({k: v for k, v in batch.items() if k != "groups"})


# ----------------------------------------------------------------------------- the model

def test_itm_model_scores_pairs(clip, data):
    torch.manual_seed(0)
    model = ITMModel(clip[0], FUSION)
    batch = sample_batch(data, 4, step=0)
    logits = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    assert logits.shape == (4, 2) and torch.isfinite(logits).all()
    scores = model.match_scores(batch["pixel_values"], batch["input_ids"],
                                batch["attention_mask"], batch_size=3)
    torch.testing.assert_close(scores, logits.softmax(-1)[:, 1].detach())
    # a caption scored alone (no padding) scores as in the padded batch
    for i in range(4):
        length = int(batch["attention_mask"][i].sum())
        alone = model.match_scores(batch["pixel_values"][i:i + 1],
                                   batch["input_ids"][i:i + 1, :length],
                                   batch["attention_mask"][i:i + 1, :length])
        torch.testing.assert_close(alone, scores[i:i + 1], atol=1e-5, rtol=1e-5)
    assert (batch["attention_mask"].sum(1) < batch["input_ids"].shape[1]).any()  # some padding


def test_itm_model_input_errors(clip, data):
    model = ITMModel(clip[0], FUSION)
    batch = sample_batch(data, 4, step=0)
    pixels, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, 3, 16, 16\)"):
        model(pixels[:, :, :8], ids, mask)
    with pytest.raises(ValueError, match="4 images but 3 captions"):
        model(pixels, ids[:3], mask[:3])
    with pytest.raises(ValueError, match="attention_mask"):
        model(pixels, ids, mask[:, :-1])
    with pytest.raises(ValueError, match="vocabulary"):
        model(pixels, ids + 10_000, mask)
    with pytest.raises(ValueError, match="at most 64"):
        model(pixels, F.pad(ids, (0, 65 - ids.shape[1])), F.pad(mask, (0, 65 - ids.shape[1])))
    with pytest.raises(TypeError, match="CLIPModel"):
        ITMModel(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kwargs, message", [
    ({"hidden_size": 30, "heads": 4}, "multiple of heads"), ({"layers": 0}, "layers=0"),
    ({"dropout": 1.0}, "dropout"), ({"text_input": "bert"}, "text_input='bert'"),
])
def test_fusion_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FusionConfig(**kwargs)


def test_image_pool_must_divide_the_patch_grid(clip):
    with pytest.raises(ValueError, match="image_pool=3"):
        ITMModel(clip[0], FusionConfig(hidden_size=32, heads=2, image_pool=3))  # 2×2 grid


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("text_input", ["clip", "tokens"])
def test_training_lowers_the_loss_and_leaves_frozen_towers_alone(clip, data, text_input):
    clip_model = clip[0]
    clip_before = _state(clip_model)
    torch.manual_seed(0)
    model = ITMModel(clip_model, FusionConfig(hidden_size=32, layers=1, heads=2,
                                              intermediate_size=64, text_input=text_input))
    vision_before = _state(model.vision)
    fusion_before = _state(model.fusion)
    batch = itm_batch(sample_batch(data, 8, step=0), "random",
                      generator=torch.Generator().manual_seed(0))

    def loss_fn(b):
        return itm_loss(model(b["pixel_values"], b["input_ids"], b["attention_mask"]), b["labels"])

    with torch.no_grad():
        before = loss_fn(batch).item()
    train(model, loss_fn, lambda step: batch, TrainConfig(steps=100, lr=3e-3, log_every=0))
    with torch.no_grad():
        after = loss_fn(batch).item()
    # below the 0.637 nats of predicting the label prior (1/3 positives): the pairs are read
    assert after < 0.45 < before
    assert all(torch.equal(v, _state(model.vision)[k]) for k, v in vision_before.items())
    assert any(not torch.equal(v, _state(model.fusion)[k]) for k, v in fusion_before.items())
    assert all(torch.equal(v, _state(clip_model)[k]) for k, v in clip_before.items())
    assert not model.vision.training  # the frozen tower stays in eval mode
    assert not any(p.requires_grad for p in model.vision.parameters())  # no optimiser sees it


def test_unfrozen_vision_trains_its_own_copy(clip, data):
    clip_model = clip[0]
    clip_before = _state(clip_model)
    model = ITMModel(clip_model, FUSION, freeze_vision=False)
    vision_before = _state(model.vision)
    train_itm(model, data, TrainConfig(steps=3, lr=1e-3, log_every=0), batch_size=4,
              print_fn=lambda _: None)
    assert any(not torch.equal(v, _state(model.vision)[k]) for k, v in vision_before.items())
    assert all(torch.equal(v, _state(clip_model)[k]) for k, v in clip_before.items())


def test_train_itm_with_hard_negatives(clip, data):
    model = ITMModel(clip[0], FUSION)
    history = train_itm(model, data, TrainConfig(steps=3, lr=1e-3, log_every=0),
                        negatives="hard", clip_model=clip[0], batch_size=4, pool_size=8)
    assert len(history.steps) == 3 and "accuracy" in history.steps[0]
    with pytest.raises(ValueError, match="pass clip_model"):
        train_itm(model, data, TrainConfig(steps=1), negatives="hard")
    with pytest.raises(ValueError, match="pool_size=2"):
        train_itm(model, data, TrainConfig(steps=1), batch_size=4, pool_size=2)


# ----------------------------------------------------------------------------- evaluation

class _OracleITM:
    """Knows the truth: log-odds +20 for a scene's own captions, -20 for any other."""

    def __init__(self, data):
        self.data = data

    def match_logits(self, pixel_values, input_ids, attention_mask, batch_size=256):
        scores = []
        for pixels, ids, mask in zip(pixel_values, input_ids, attention_mask):
            scene = next(s for s in range(len(self.data))
                         if torch.equal(self.data.pixel_values[s], pixels))
            key = ids[mask.bool()].tolist()
            own = [self.data.input_ids[scene, p][self.data.attention_mask[scene, p].bool()].tolist()
                   for p in range(self.data.phrasings)]
            scores.append(20.0 if key in own else -20.0)
        return torch.tensor(scores)


def test_rerank_with_an_oracle_reaches_recall_at_k(clip, data):
    out = rerank(clip[0], _OracleITM(data), data, k=5)
    assert out["k"] == 5
    assert out["R@1_reranked"] == pytest.approx(out["R@5_contrastive"])
    assert out["R@1_contrastive"] < out["R@5_contrastive"]  # an untrained CLIP: room to gain
    first = rerank(clip[0], _OracleITM(data), data, k=1)
    assert first["R@1_reranked"] == pytest.approx(first["R@1_contrastive"])
    # a dominant contrastive term gives CLIP's own ranking back
    cold = rerank(clip[0], _OracleITM(data), data, k=5, itc_temperature=1e-4)
    assert cold["R@1_reranked"] == pytest.approx(cold["R@1_contrastive"])
    with pytest.raises(ValueError, match="k=0"):
        rerank(clip[0], _OracleITM(data), data, k=0)
    with pytest.raises(ValueError, match="itc_temperature=0"):
        rerank(clip[0], _OracleITM(data), data, itc_temperature=0)


def test_evaluations_report_every_change(clip, data, tokenizer):
    model = ITMModel(clip[0], FUSION)
    scenes = make_scenes(24, seed=5)
    out = evaluate_fine_grained(clip[0], model, tokenizer, data.pixel_values,
                                fine_grained_pairs(scenes))
    for name in ("contrastive", "itm", "itm_accuracy"):
        assert 0 <= out[name] <= 1 and all(f"{name}_{c}" in out for c in CHANGES)
    result = evaluate_itm(model, data)
    assert set(result) == {"accuracy", "positive_accuracy", "negative_accuracy"}
    with torch.no_grad():
        sim = similarity_matrix(clip[0], sample_batch(data, 4, step=0))
    assert sim.shape == (4, 4)
