"""LLaVA written out (``companion/llava.py``) equals ``LlavaForConditionalGeneration``, and the
vision-feature cache returns exactly what the frozen tower computes."""

import pytest
import torch

from companion.instruction import encode_records, instruction_tuning_step, train_stage
from companion.llava import (VisionFeatureCache, inputs_embeds, merge_image_tokens, project,
                             vision_features)
from companion.models import TinyClipConfig, build_clip
from companion.stages import apply_stage
from companion.tokenizer import train_tokenizer, world_corpus
from companion.llava import image_seq_length
from companion.lm import TinyLMConfig, build_lm
from companion.tokenizer import image_token_id
from companion.vlm import build_vlm
from companion.world import make_instruction_dataset, make_scenes, render_scene

CLIP_SIZES = TinyClipConfig(image_size=16, patch_size=8, vision_width=32, vision_layers=2,
                            text_width=32, text_layers=1, heads=2, projection_dim=16)
LM_SIZES = TinyLMConfig(hidden_size=32, layers=1, heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def world():
    tokenizer = train_tokenizer(world_corpus(40, seed=1), vocab_size=400)
    clip, processor, _ = build_clip(tokenizer, sizes=CLIP_SIZES, seed=0)
    lm, _ = build_lm(tokenizer, sizes=LM_SIZES, seed=0)
    vlm = build_vlm(clip, lm, tokenizer, seed=0)
    scenes = make_scenes(6, seed=4)
    records = make_instruction_dataset(scenes, tasks=("description", "counting"), seed=4)
    by_id = {s.scene_id: s for s in scenes}
    data = encode_records(records, tokenizer, processor, image_seq_length(vlm),
                          lambda r: render_scene(by_id[r["scene_id"]], 16))
    return {"tokenizer": tokenizer, "vlm": vlm, "data": data}


def test_written_out_llava_gives_the_library_models_logits(world):
    vlm, data = world["vlm"], world["data"]
    vlm.eval()
    batch = data.batch(4, step=0, pad_id=world["tokenizer"].pad_token_id)
    with torch.no_grad():
        library = vlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"]).logits
        embeds = inputs_embeds(vlm, batch["input_ids"], pixel_values=batch["pixel_values"])
        ours = vlm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    assert torch.equal(ours, library)


def test_the_steps_have_the_shapes_llava_gives_them(world):
    vlm, data = world["vlm"], world["data"]
    pixels = data.pixel_values[:3]
    features = vision_features(vlm, pixels)
    patches = (16 // 8) ** 2
    assert features.shape == (3, patches, CLIP_SIZES.vision_width)  # CLS dropped
    # the penultimate layer, as configured (vision_feature_layer=-2), not the last
    hidden = vlm.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    assert torch.equal(features, hidden[-2][:, 1:])
    assert not torch.equal(features, hidden[-1][:, 1:])
    assert project(vlm, features).shape == (3, patches, LM_SIZES.hidden_size)


def test_merge_puts_each_rows_vision_tokens_at_its_placeholders_in_order():
    image_id = 9
    ids = torch.tensor([[1, 9, 9, 2, 0], [9, 9, 3, 4, 5]])
    text = torch.arange(2 * 5 * 2, dtype=torch.float32).reshape(2, 5, 2)
    vision = -torch.arange(1, 2 * 2 * 2 + 1, dtype=torch.float32).reshape(2, 2, 2)
    merged = merge_image_tokens(ids, text, vision, image_id)
    assert torch.equal(merged[0, 1:3], vision[0]) and torch.equal(merged[1, 0:2], vision[1])
    keep = ids != image_id
    assert torch.equal(merged[keep], text[keep])
    assert torch.equal(text[0, 1], torch.tensor([2.0, 3.0]))  # the input is not modified
    with pytest.raises(ValueError, match=r"each row needs 2 <image> tokens .* \[2, 1\]"):
        merge_image_tokens(torch.tensor([[9, 9], [9, 1]]), text[:, :2], vision, image_id)
    with pytest.raises(ValueError, match="exactly one of pixel_values and features"):
        inputs_embeds(None, ids)


def test_the_cache_returns_exactly_what_the_tower_computes(world):
    vlm, data = world["vlm"], world["data"]
    apply_stage(vlm, "stage1")
    cache = VisionFeatureCache(vlm, data.pixel_values)
    assert len(cache) == len(data)
    with torch.no_grad():
        direct = vision_features(vlm, data.pixel_values)
    assert torch.equal(cache[list(range(len(data)))], direct)
    rows = [3, 0, 3]
    with torch.no_grad():
        assert torch.allclose(cache[rows], vision_features(vlm, data.pixel_values[rows]),
                              rtol=0, atol=1e-6)


def test_a_step_from_cached_features_gives_the_loss_and_gradients_of_a_step_from_pixels(world):
    vlm, data, pad = world["vlm"], world["data"], world["tokenizer"].pad_token_id
    apply_stage(vlm, "stage2")
    batch = data.batch(4, step=1, pad_id=pad)
    vlm.zero_grad()
    loss = instruction_tuning_step(vlm, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}
    data.cache_vision_features(vlm)
    try:
        cached = data.batch(4, step=1, pad_id=pad)
        assert "pixel_values" not in cached and cached["vision_features"].shape[:2] == (4, 4)
        vlm.zero_grad()
        loss_cached = instruction_tuning_step(vlm, cached)
        loss_cached.backward()
        assert torch.allclose(loss_cached, loss, rtol=0, atol=1e-6)
        for name, grad in grads.items():
            assert torch.allclose(vlm.get_parameter(name).grad, grad, rtol=1e-5, atol=1e-7), name
        assert not any(n.startswith("model.vision_tower.") for n in grads)
    finally:
        data.drop_vision_features()


def test_a_tower_that_learns_is_never_served_from_the_cache(world):
    vlm, data, pad = world["vlm"], world["data"], world["tokenizer"].pad_token_id
    apply_stage(vlm, "stage1")
    data.cache_vision_features(vlm)
    try:
        with pytest.raises(ValueError, match="the vision tower learns .* cannot be cached"):
            train_stage(vlm, "all", data, steps=1, lr=1e-3, batch_size=2, seed=0, pad_id=pad,
                        log=None, parts=("vision", "projector", "lm"))
    finally:
        data.drop_vision_features()
    vlm.model.vision_tower.requires_grad_(True)
    with pytest.raises(ValueError, match="the vision tower learns"):
        VisionFeatureCache(vlm, data.pixel_values)
    assert image_token_id(world["tokenizer"]) == vlm.config.image_token_index


def test_merge_patches_joins_each_block_of_neighbours_in_reading_order():
    """Against a loop over blocks: token (by, bx) holds patches (by·f + fy, bx·f + fx)."""
    from companion.llava import merge_patches

    features = torch.randn(2, 36, 3, dtype=torch.float64)
    merged = merge_patches(features, 2)
    assert merged.shape == (2, 9, 12)
    for by in range(3):
        for bx in range(3):
            parts = [features[:, (2 * by + fy) * 6 + 2 * bx + fx] for fy in range(2)
                     for fx in range(2)]
            assert torch.equal(merged[:, by * 3 + bx], torch.cat(parts, dim=-1))
    assert torch.equal(merge_patches(features, 1), features)
    for bad in (4, 0):
        with pytest.raises(ValueError, match=f"multiple of merge factor {bad}"):
            merge_patches(features, bad)


def test_a_vlm_with_merged_patches_reads_one_token_per_block_and_saves_and_loads(tmp_path):
    """merge_patches=2: a quarter of the tokens, each the projector of a 2 x 2 block; the
    written-out steps give the library model's logits; a saved model loads back the same."""
    from companion.llava import LlavaWithMergedPatches, merge_patches
    from companion.vlm import load_vlm, save_vlm

    tokenizer = train_tokenizer(world_corpus(40, seed=1), vocab_size=400)
    sizes = TinyClipConfig(image_size=16, patch_size=4, vision_width=32, vision_layers=2,
                           text_width=32, text_layers=1, heads=2, projection_dim=16)
    clip, processor, _ = build_clip(tokenizer, sizes=sizes, seed=0)
    lm, _ = build_lm(tokenizer, sizes=LM_SIZES, seed=0)
    vlm = build_vlm(clip, lm, tokenizer, seed=0, merge_patches=2).eval()
    assert isinstance(vlm, LlavaWithMergedPatches) and image_seq_length(vlm) == 4
    projector = vlm.model.multi_modal_projector
    assert projector.linear_1.in_features == 4 * 32
    scenes = make_scenes(3, seed=4)
    records = make_instruction_dataset(scenes, tasks=("description",), seed=4)
    by_id = {s.scene_id: s for s in scenes}
    data = encode_records(records, tokenizer, processor, 4,
                          lambda r: render_scene(by_id[r["scene_id"]], 16))
    batch = data.batch(3, step=0, pad_id=tokenizer.pad_token_id)
    features = vision_features(vlm, batch["pixel_values"])
    assert features.shape == (3, 16, 32)
    with torch.no_grad():
        tokens = project(vlm, features)
        by_hand = projector.linear_2(projector.act(projector.linear_1(
            merge_patches(features, 2))))
        library = vlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"]).logits
        embeds = inputs_embeds(vlm, batch["input_ids"], pixel_values=batch["pixel_values"])
        ours = vlm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    assert tokens.shape == (3, 4, LM_SIZES.hidden_size) and torch.equal(tokens, by_hand)
    assert torch.equal(ours, library)
    save_vlm(tmp_path / "merged", vlm, processor, tokenizer)
    loaded, _, _ = load_vlm(tmp_path / "merged")
    assert isinstance(loaded, LlavaWithMergedPatches) and image_seq_length(loaded) == 4
    with torch.no_grad():
        again = loaded.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              pixel_values=batch["pixel_values"]).logits
    assert torch.equal(again, library)
    with pytest.raises(ValueError, match="merge_patches=3"):
        build_vlm(clip, lm, tokenizer, merge_patches=3)
