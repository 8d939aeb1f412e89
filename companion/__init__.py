"""Companion package of the executable chapter "Training paradigms of multimodal models".

Every algorithm the chapter teaches lives here exactly once; the notebooks import it.
Names are imported lazily, so ``python -m companion book list`` starts without torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # the shapes world (companion/world/)
    "WorldConfig": "companion.world",
    "Scene": "companion.world",
    "SceneObject": "companion.world",
    "make_scenes": "companion.world",
    "render_scene": "companion.world",
    "scene_captions": "companion.world",
    "make_task_sample": "companion.world",
    "judge_answer": "companion.world",
    "TASK_TYPES": "companion.world",
    "SHAPES": "companion.world",
    "COLORS": "companion.world",
    "SIZES": "companion.world",
    "REGIONS": "companion.world",
    "WORDS": "companion.world",
    "canonical_caption": "companion.world",
    "make_instruction_dataset": "companion.world",
    "make_caption_pairs": "companion.world",
    "judge_description": "companion.world",
    "judge_conversation": "companion.world",
    "JudgeResult": "companion.world",
    "export_llava_dataset": "companion.world",
    "load_world_dataset": "companion.world",
    "scene_png_bytes": "companion.world",
    "parse_answer": "companion.world",
    "described_objects": "companion.world",
    # LLaVA conversation format (companion/data/llava.py)
    "load_llava_json": "companion.data.llava",
    "save_llava_json": "companion.data.llava",
    "validate_llava_records": "companion.data.llava",
    "LlavaFormatError": "companion.data.llava",
    "normalize_role": "companion.data.llava",
    "iter_turns": "companion.data.llava",
    # tokenizer (companion/tokenizer.py)
    "train_tokenizer": "companion.tokenizer",
    "prepare_tokenizer": "companion.tokenizer",
    "encode_chat": "companion.tokenizer",
    # contrastive losses (companion/losses/contrastive.py, tiled.py)
    "info_nce_loss": "companion.losses.contrastive",
    "siglip_loss": "companion.losses.contrastive",
    "ClipLoss": "companion.losses.contrastive",
    "SiglipLoss": "companion.losses.contrastive",
    "contrastive_logits": "companion.losses.contrastive",
    "tiled_info_nce_loss": "companion.losses.tiled",
    "distributed_info_nce_loss": "companion.distributed",
    "gather_with_grad": "companion.distributed",
    # image-text matching (companion/losses/matching.py, companion/matching.py)
    "ITMHead": "companion.losses.matching",
    "itm_loss": "companion.losses.matching",
    "sample_hard_negatives": "companion.losses.matching",
    "sample_random_negatives": "companion.losses.matching",
    "ITMModel": "companion.matching",
    "FusionConfig": "companion.matching",
    "fine_grained_negative": "companion.matching",
    # image-grounded generation (companion/losses/generation.py)
    "generation_loss": "companion.losses.generation",
    "caption_inputs": "companion.losses.generation",
    "generate_captions": "companion.losses.generation",
    # the LM, the VLM, instruction tuning and answering (companion/lm.py, vlm.py, llava.py,
    # instruction.py, answers.py, stages.py)
    "build_vlm": "companion.vlm",
    "build_lm": "companion.lm",
    "LMRecipe": "companion.lm",
    "pretrained_lm": "companion.lm",
    "generate_replies": "companion.answers",
    "evaluate_tasks": "companion.answers",
    "TaskScores": "companion.answers",
    "build_example": "companion.instruction",
    "LlavaCollator": "companion.instruction",
    "instruction_tuning_step": "companion.instruction",
    "apply_stage": "companion.stages",
    "InstructionRecipe": "companion.instruction",
    "instruction_tuned_vlm": "companion.instruction",
    "encode_file_data": "companion.instruction",
    # what the vision tokens carry vs what the model says (companion/probe.py)
    "vision_tokens": "companion.probe",
    "cell_labels": "companion.probe",
    "train_probe": "companion.probe",
    "probe_accuracy": "companion.probe",
    "description_cell_accuracy": "companion.probe",
    # LoRA, optional (companion/lora.py; needs peft)
    "add_lora": "companion.lora",
    "merge_lora": "companion.lora",
    "LoraSettings": "companion.lora",
    # RLHF and DPO (companion/losses/preference.py, losses/ppo.py, preference.py, ppo.py, dpo.py)
    "bradley_terry_loss": "companion.losses.preference",
    "dpo_loss": "companion.losses.preference",
    "sequence_logprobs": "companion.losses.preference",
    "gae": "companion.losses.ppo",
    "whiten": "companion.losses.ppo",
    "kl_penalty": "companion.losses.ppo",
    "ppo_policy_loss": "companion.losses.ppo",
    "ppo_value_loss": "companion.losses.ppo",
    "AdaptiveKLController": "companion.losses.ppo",
    "RewardModel": "companion.preference",
    "reward_model_loss": "companion.preference",
    "label_preferences": "companion.preference",
    "load_preferences": "companion.preference",
    "dpo_batch_loss": "companion.dpo",
    "train_dpo": "companion.dpo",
    "PolicyWithValueHead": "companion.ppo",
    "train_ppo": "companion.ppo",
    "RLHFRecipe": "companion.rlhf",
    # training, models, evaluation
    "TrainConfig": "companion.train",
    "build_clip": "companion.models",
    "retrieval_metrics": "companion.evaluate",
    "paired_difference": "companion.evaluate",
    "task_mean_difference": "companion.evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'companion' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
