"""LoRA on the LLaVA language model: exact start, frozen base weights, merge, save/load."""

import copy
import sys

import pytest
import torch

pytest.importorskip("peft", reason="LoRA is optional: pip install peft")

from companion.instruction import LlavaCollator, instruction_tuning_step  # noqa: E402
from companion.lora import LoraSettings, add_lora, has_lora, merge_lora  # noqa: E402
from companion.models import TinyClipConfig, build_clip  # noqa: E402
from companion.stages import apply_stage, part_of, trainable_summary  # noqa: E402
from companion.tokenizer import train_tokenizer, world_corpus  # noqa: E402
from companion.train import TrainConfig, train  # noqa: E402
from companion.lm import TinyLMConfig, build_lm
from companion.vlm import build_vlm, load_vlm, save_vlm
from companion.world import make_instruction_dataset, make_scenes, render_scene  # noqa: E402

CLIP_SIZES = TinyClipConfig(image_size=16, patch_size=8, vision_width=32, vision_layers=1,
                            text_width=32, text_layers=1, heads=2, projection_dim=16)
LM_SIZES = TinyLMConfig(hidden_size=32, layers=2, heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def parts():
    tokenizer = train_tokenizer(world_corpus(40, seed=1), vocab_size=400)
    clip, processor, _ = build_clip(tokenizer, sizes=CLIP_SIZES, seed=0)
    lm, _ = build_lm(tokenizer, sizes=LM_SIZES, seed=0)
    vlm = build_vlm(clip, lm, tokenizer, seed=0)
    scenes = make_scenes(4, seed=3)
    by_id = {s.scene_id: s for s in scenes}
    records = make_instruction_dataset(scenes, seed=3)
    collator = LlavaCollator(tokenizer, processor, 4,
                             lambda r: render_scene(by_id[r["scene_id"]], 16))
    return {"tokenizer": tokenizer, "processor": processor, "vlm": vlm,
            "batch": collator(records[:6])}


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"]).logits


def test_adapters_start_at_zero_so_the_adapted_model_computes_the_same(parts):
    model = copy.deepcopy(parts["vlm"])
    n = add_lora(model, LoraSettings(rank=4, alpha=8))
    # rank 4 on 7 linear layers of each of the 2 LM blocks: A (4 x in) + B (out x 4)
    hidden, inter = LM_SIZES.hidden_size, LM_SIZES.intermediate_size
    per_block = 4 * (4 * (hidden + hidden)) + 2 * 4 * (hidden + inter) + 4 * (inter + hidden)
    assert n == LM_SIZES.layers * per_block
    assert has_lora(model) and all(part_of(name) == "lm" for name, _ in model.named_parameters()
                                   if ".lora_" in name)
    assert torch.equal(_logits(model, parts["batch"]), _logits(parts["vlm"], parts["batch"]))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(model, 4)


def test_stage2_with_lora_trains_adapters_and_projector_never_the_base_weights(parts):
    model = copy.deepcopy(parts["vlm"])
    add_lora(model, 4)
    counts = apply_stage(model, "stage2")
    assert counts["lm"] == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert counts["vision"] == 0 and counts["projector"] > 0
    assert trainable_summary(model)["lm"][0] == counts["lm"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, lambda b: instruction_tuning_step(model, b), lambda step: parts["batch"],
          TrainConfig(steps=5, lr=1e-2, warmup_fraction=0.0, log_every=0))
    for name, parameter in model.named_parameters():
        changed = not torch.equal(parameter, before[name])
        should_change = ".lora_B" in name or part_of(name) == "projector"
        if should_change:
            assert changed, f"{name} did not learn"
        elif ".lora_A" not in name:  # A moves too; everything else is frozen
            assert not changed, f"{name} changed but is frozen"


def test_merge_folds_each_adapter_into_its_weight_and_saves_a_plain_llava(parts, tmp_path):
    model = copy.deepcopy(parts["vlm"])
    add_lora(model, LoraSettings(rank=4, alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():  # give the adapters some values, as training would
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                parameter.normal_(0, 0.2)
    layer = model.model.language_model.layers[0].self_attn.q_proj
    expected = (layer.base_layer.weight.double()
                + (8 / 4) * layer.lora_B["default"].weight.double()
                @ layer.lora_A["default"].weight.double())
    adapted = _logits(model, parts["batch"])
    assert not torch.allclose(adapted, _logits(parts["vlm"], parts["batch"]))
    assert merge_lora(model) == LM_SIZES.layers * 7
    assert not has_lora(model) and merge_lora(model) == 0
    merged_weight = model.model.language_model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(merged_weight.double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(model, parts["batch"]), adapted, rtol=1e-4, atol=1e-5)
    save_vlm(tmp_path / "merged", model, parts["processor"], parts["tokenizer"])
    loaded, _, _ = load_vlm(str(tmp_path / "merged"))
    assert not has_lora(loaded)
    torch.testing.assert_close(_logits(loaded, parts["batch"]), adapted, rtol=1e-4, atol=1e-5)


def test_bad_settings_and_a_missing_peft_are_clear_errors(parts, monkeypatch):
    with pytest.raises(ValueError, match="rank=-1"):
        LoraSettings(rank=-1)
    with pytest.raises(ValueError, match="dropout=1"):
        LoraSettings(dropout=1)
    model = copy.deepcopy(parts["vlm"])
    with pytest.raises(ValueError, match="none of the LoRA targets .*c_attn"):
        add_lora(model, 4, targets=["c_attn"])
    with pytest.raises(ValueError, match="expects a LlavaForConditionalGeneration"):
        add_lora(torch.nn.Linear(2, 2), 4)
    assert add_lora(model, 0) == 0 and not has_lora(model)
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match="pip install peft.*lora_rank=0"):
        add_lora(model, 4)
