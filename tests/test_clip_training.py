"""CLIP pre-training glue, the training loop and retrieval evaluation."""

import math

import pytest
import torch

from companion.clip import (ContrastiveModel, build_caption_data, evaluate_retrieval, sample_batch,
                            text_embeddings, tokenize_captions, image_embeddings)
from companion.evaluate import recall_at_k, retrieval_metrics, zero_shot_classify
from companion.losses.contrastive import ClipLoss
from companion.models import TinyClipConfig, build_clip
from companion.tokenizer import train_tokenizer
from companion.train import TrainConfig, train, warmup_cosine
from companion.world import make_scenes, scene_captions

SIZES = TinyClipConfig(image_size=16, patch_size=8, vision_width=32, vision_layers=1,
                       text_width=32, text_layers=1, heads=2, projection_dim=16)


@pytest.fixture(scope="module")
def tokenizer():
    scenes = make_scenes(60, seed=3)
    return train_tokenizer([c for s in scenes for c in scene_captions(s)], vocab_size=320)


@pytest.fixture(scope="module")
def data(tokenizer):
    _, processor, _ = build_clip(tokenizer, sizes=SIZES)
    return build_caption_data(make_scenes(24, seed=5), tokenizer, processor, render_size=32)


def test_recall_at_k_by_hand():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.0], [0.0, 0.1, 0.2]])
    # query 1's best candidate (0) is wrong, its second (1) right
    out = recall_at_k(sim, [0, 1, 5], [5, 1, 2], ks=(1, 2))
    assert out[1] == 0.0  # every query's best candidate belongs to another group
    assert out[2] == pytest.approx(1 / 3)  # only query 1 finds its group in the top 2
    with pytest.raises(ValueError, match="groups must have shapes"):
        recall_at_k(sim, [0, 1], [5, 1, 2])


def test_same_description_counts_as_hit():
    images = torch.eye(3)
    texts = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    # image 0's best text is text 1, which describes a scene of the same group
    metrics = retrieval_metrics(images, texts, [7, 8, 9], [8, 7, 9])
    assert metrics["i2t_R@1"] == 1.0 and metrics["t2i_R@1"] == 1.0
    metrics = retrieval_metrics(images, texts, [7, 8, 9], [7, 8, 9])
    assert metrics["i2t_R@1"] == pytest.approx(1 / 3)


def test_zero_shot_mean_and_max():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    prompts = torch.tensor([[[1.0, 0.0], [-1.0, 0.2]],    # class 0: one good prompt, one bad
                            [[0.6, 0.8], [0.6, 0.8]]])     # class 1
    assert zero_shot_classify(images, prompts, "max").tolist() == [0, 1]
    # bad prompt blurs class 0
    assert zero_shot_classify(images, prompts, "mean").tolist() == [1, 0]
    with pytest.raises(ValueError, match="reduction='median'"):
        zero_shot_classify(images, prompts, "median")


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps=0"), ({"lr": -1.0}, "lr=-1.0"), ({"lr": math.nan}, "lr=nan"),
    ({"warmup_fraction": 1.0}, "warmup_fraction"), ({"accumulation": 0}, "accumulation"),
    ({"grad_clip": 0.0}, "grad_clip"),
])
def test_train_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_train_rejects_nan_and_frozen_models():
    model = torch.nn.Linear(2, 1)
    with pytest.raises(FloatingPointError, match="at step 0"):
        train(model, lambda b: model(b).sum() * math.nan, lambda s: torch.ones(1, 2),
              TrainConfig(steps=2, log_every=0))
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, lambda b: model(b).sum(), lambda s: torch.ones(1, 2),
              TrainConfig(steps=2, log_every=0))


def test_tokenize_captions_ends_with_eos(tokenizer):
    ids, mask = tokenize_captions(tokenizer, ["a red circle.", "a large blue square at the top."])
    for row, m in zip(ids, mask):
        length = int(m.sum())
        assert row[0] == tokenizer.bos_token_id and row[length - 1] == tokenizer.eos_token_id
        assert (row[length:] == tokenizer.pad_token_id).all()


def test_text_features_pool_at_eos(tokenizer):
    """Extra padding after the caption must not change its embedding (pooling at eos)."""
    model, _, _ = build_clip(tokenizer, sizes=SIZES)
    ids, mask = tokenize_captions(tokenizer, ["a small red circle at the top left."])
    padded = torch.cat([ids, torch.full((1, 5), tokenizer.pad_token_id)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a = text_embeddings(model, ids, mask)
        b = text_embeddings(model, padded, padded_mask)
    torch.testing.assert_close(a, b)


def test_sample_batch_is_deterministic_and_distinct(data):
    a = sample_batch(data, 8, step=3, seed=1)
    b = sample_batch(data, 8, step=3, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["pixel_values"], sample_batch(data, 8, step=4, seed=1)["pixel_values"])
    with pytest.raises(ValueError, match="exceeds the 24 training scenes"):
        sample_batch(data, 25, step=0)
    with pytest.raises(ValueError, match="phrasing=9"):
        sample_batch(data, 4, step=0, phrasing=9)
    first = sample_batch(data, 8, step=0, phrasing="first")
    # identical caption texts share a caption id
    ids = first["caption_ids"]
    for i in range(8):
        for j in range(8):
            same = torch.equal(first["input_ids"][i], first["input_ids"][j])
            assert (ids[i] == ids[j]).item() == same


def test_a_few_steps_lower_the_loss_and_improve_retrieval(data, tokenizer):
    model, _, _ = build_clip(tokenizer, sizes=SIZES, seed=0)
    loss = ClipLoss()
    pair = ContrastiveModel(model, loss)
    batch = sample_batch(data, 16, step=0, phrasing="first")
    with torch.no_grad():
        before = pair(batch)[0].item()
    history = train(pair, pair, lambda s: batch, TrainConfig(steps=80, lr=3e-3, log_every=0),
                    after_step=lambda _: loss.clamp_())
    with torch.no_grad():
        after = pair(batch)[0].item()
    assert after < 0.5 * before
    assert len(history.steps) == 80 and "temperature" in history.steps[0]
    metrics = evaluate_retrieval(model, data, phrasing=0)
    assert set(metrics) == {"i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"}


def test_clip_loads_from_a_local_checkpoint(tokenizer, tmp_path, data):
    """The checkpoint path (hub id or folder) is the same code path a real CLIP uses."""
    model, processor, _ = build_clip(tokenizer, sizes=SIZES, seed=1)
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    loaded, loaded_processor, loaded_tokenizer = build_clip(checkpoint=str(tmp_path / "clip"))
    pixels = data.pixel_values[:3]
    with torch.no_grad():
        torch.testing.assert_close(image_embeddings(model, pixels),
                                   image_embeddings(loaded, pixels))
    from companion.world import render_scene
    image = render_scene(make_scenes(1, seed=0)[0], 32)
    torch.testing.assert_close(
        processor(images=[image], return_tensors="pt")["pixel_values"],
        loaded_processor(images=[image], return_tensors="pt")["pixel_values"])
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    with pytest.raises(ValueError, match="needs a tokenizer"):
        build_clip()


def test_recall_with_a_relevance_matrix():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.0]])
    relevance = torch.tensor([[False, True, False], [True, True, False]])
    out = recall_at_k(sim, ks=(1, 2), relevance=relevance)
    assert out[1] == pytest.approx(0.5) and out[2] == 1.0
    with pytest.raises(ValueError, match="not both"):
        recall_at_k(sim, [0, 1], [0, 1, 2], relevance=relevance)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        recall_at_k(sim, relevance=relevance.float())
    with pytest.raises(ValueError, match="query 1 has no correct candidate"):
        recall_at_k(sim, relevance=torch.tensor([[True, False, False], [False] * 3]))
    with pytest.raises(ValueError, match="needs query_groups"):
        recall_at_k(sim)


def test_candidate_pool_merges_identical_captions(data):
    from companion.clip import candidate_captions

    index, relevance = candidate_captions(data)
    texts = [data.captions[s][p] for s, p in index.tolist()]
    assert len(texts) == len(set(texts))                        # each text once
    everything = {c for captions in data.captions for c in captions}
    assert set(texts) == everything                             # and every text
    for s, captions in enumerate(data.captions):                # relevant = own captions
        assert {texts[t] for t in relevance[s].nonzero().flatten().tolist()} == set(captions)
    _, one = candidate_captions(data, phrasing=0)
    assert one.sum(dim=1).eq(1).all()
    with pytest.raises(ValueError, match="phrasing=9"):
        candidate_captions(data, phrasing=9)


def test_identical_caption_texts_cannot_split_a_hit():
    """Two scenes with the same position-free caption: retrieving either copy is a hit."""
    from companion.clip import CaptionData, evaluate_retrieval

    class Fixed(torch.nn.Module):  # embeds image i and caption text deterministically
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def get_image_features(self, pixel_values):
            return pixel_values.flatten(1)[:, :2]

        def get_text_features(self, input_ids, attention_mask):
            return input_ids[:, :2].float()

    pixels = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(2, 2, 1, 1)
    ids = torch.tensor([[[1, 0], [5, 5]], [[0, 1], [5, 5]]])  # phrasing 1 identical
    captions = [["scene A at left", "one red circle"], ["scene B at right", "one red circle"]]
    data = CaptionData(pixels, ids, torch.ones_like(ids), torch.tensor([0, 1]), captions)
    metrics = evaluate_retrieval(Fixed(), data, phrasing=1)
    assert metrics["i2t_R@1"] == 1.0 and metrics["t2i_R@1"] == 1.0


def test_pretrained_clip_is_trained_once_and_cached(tmp_path, tokenizer):
    from companion.clip import ClipRecipe, pretrain_clip, pretrained_clip, publish_clip

    recipe = ClipRecipe(train_scenes=40, batch_size=8, steps=3, image_size=16, tokenizer_scenes=30)
    messages = []
    model, processor, loaded_tokenizer = pretrained_clip(tmp_path, recipe, log=messages.append)
    assert any("building clip" in m for m in messages)
    again, _, _ = pretrained_clip(tmp_path, recipe, log=messages.append)
    assert any("loaded clip" in m for m in messages)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    # a notebook's own run of the same recipe is the same model (deterministic), and
    # publishing it does not replace the cached one
    run = pretrain_clip(recipe, loaded_tokenizer, log_every=0)
    for (name, a), (_, b) in zip(model.state_dict().items(), run.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert publish_clip(tmp_path, recipe, run, log=None).is_dir()
    with pytest.raises(ValueError, match="exceeds train_scenes"):
        ClipRecipe(train_scenes=4, batch_size=8)
    with pytest.raises(ValueError, match="steps=0"):
        ClipRecipe(steps=0)


def test_clip_recipe_sizes_reach_the_model_and_the_cache_key(tmp_path, tokenizer):
    """patch_size and vision_width build the tower they name, enter the cache key when they
    differ from the defaults (so two sizes never share a cached CLIP), and leave the key of a
    default recipe as it was before they existed."""
    from companion.clip import ClipRecipe, _clip_artifact_config, pretrain_clip
    from companion.instruction import InstructionRecipe

    old_key = {"seed": 0, "tokenizer_scenes": 2000, "train_scenes": 8000, "image_size": 48,
               "batch_size": 64, "steps": 1800, "lr": 3e-3, "weight_decay": 0.1,
               "warmup_fraction": 0.05, "checkpoint": ""}
    assert ClipRecipe().to_dict() == old_key
    cell = ClipRecipe(patch_size=16, vision_width=32, vision_layers=1)
    assert cell.to_dict() == {**old_key, "patch_size": 16, "vision_width": 32,
                              "vision_layers": 1}
    keys = [_clip_artifact_config(r) for r in (ClipRecipe(), cell, ClipRecipe(patch_size=16))]
    assert keys[0]["sizes"]["patch_size"] == 8 and keys[1]["sizes"]["vision_width"] == 32
    assert keys[0] != keys[2] != keys[1]
    run = pretrain_clip(ClipRecipe(train_scenes=16, batch_size=8, steps=1, image_size=32,
                                   patch_size=16, vision_width=32, vision_layers=1), tokenizer,
                         log_every=0)
    vision = run.model.config.vision_config
    assert (vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (16, 32, 1)
    assert run.model.vision_model.embeddings.position_embedding.weight.shape[0] == 1 + 4
    sft = InstructionRecipe(clip_image_size=96, clip_patch_size=32, clip_vision_width=32,
                            clip_vision_layers=3)
    clip = sft.clip_recipe()
    assert (clip.image_size, clip.patch_size, clip.vision_width, clip.vision_layers) == (
        96, 32, 32, 3)
    assert {"clip_image_size": 96, "clip_patch_size": 32, "clip_vision_width": 32,
            "clip_vision_layers": 3}.items() <= sft.to_dict().items()
    assert "clip_patch_size" not in InstructionRecipe().to_dict()
    with pytest.raises(ValueError, match="image_size=48 must be a multiple of patch_size=10"):
        ClipRecipe(patch_size=10)
    with pytest.raises(ValueError, match="vision_width=0 must be positive"):
        ClipRecipe(vision_width=0)
