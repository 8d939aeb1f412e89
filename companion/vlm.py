"""The vision-language model of sections 3.2 to 3.4: LLaVA on real ``transformers`` classes.

``LlavaForConditionalGeneration`` = a CLIP vision tower (trained in 3.1.1) + the LLaVA-1.5
projector (linear, GELU, linear) + a causal LM (:mod:`companion.lm`, pretrained on the
world's text). :func:`build_vlm` assembles it; any real LLaVA checkpoint loads instead
(:func:`load_vlm`). What the model does with an image is written out in
:mod:`companion.llava`.

The LM's names (``LMRecipe``, ``pretrained_lm``, ...), the tokenizer's ids
(``image_token_id``, ``end_of_turn_id``, ...) and ``image_seq_length`` are importable from
here too, where the notebooks first met them.
"""

from __future__ import annotations

import torch
from transformers import (AutoConfig, AutoImageProcessor, AutoTokenizer, LlavaConfig,
                          LlavaForConditionalGeneration)

from companion.llava import LlavaWithMergedPatches, image_seq_length
from companion.lm import (LM_CURVE_MAX_NEW_TOKENS, LM_CURVE_SCENES, LM_CURVE_STEPS, SCENE_PREFIX,
                          LMRecipe, TinyLMConfig, build_lm, lm_corpus, lm_reply_labels,
                          lm_training_examples, pretrain_lm, pretrain_lm_with_curve, pretrained_lm,
                          scene_as_text, text_only_conversations, told_in_words)
from companion.tokenizer import (IMAGE_TOKEN, end_of_turn_id, fit_embeddings, image_token_id,
                                 prepare_tokenizer)

__all__ = [  # this module's own, then the names re-exported from where they live now
    "build_vlm", "load_vlm", "save_vlm",
    "image_seq_length", "IMAGE_TOKEN", "end_of_turn_id", "fit_embeddings", "image_token_id",
    "LM_CURVE_MAX_NEW_TOKENS", "LM_CURVE_SCENES", "LM_CURVE_STEPS", "SCENE_PREFIX", "LMRecipe",
    "TinyLMConfig", "build_lm", "lm_corpus", "lm_reply_labels", "lm_training_examples",
    "pretrain_lm", "pretrain_lm_with_curve", "pretrained_lm", "scene_as_text",
    "text_only_conversations", "told_in_words",
]


# ----------------------------------------------------------------------------- the VLM

def build_vlm(vision_model, lm, tokenizer, vision_feature_layer: int = -2, seed: int = 0,
              merge_patches: int = 1):
    """Assemble ``LlavaForConditionalGeneration`` from a trained CLIP (or its vision tower)
    and a causal LM, with a fresh LLaVA-1.5 projector (two linear layers with GELU).

    ``vision_feature_select_strategy="default"`` drops the CLS token, so an image becomes
    one token per patch. Like LLaVA-1.5 it reads the penultimate vision layer
    (``vision_feature_layer=-2``): CLIP's loss only looks at the CLS token of the last
    layer, so the last layer's patch outputs are never trained to mean anything, while the
    penultimate layer's patch features are what that CLS token attends to.

    ``merge_patches=m`` > 1 joins each m × m block of patches into one vision token
    (:class:`companion.llava.LlavaWithMergedPatches`): 6 × 6 patches become 9 tokens.
    """
    tower = getattr(vision_model, "vision_model", vision_model)  # CLIPModel or CLIPVisionModel
    vision_config = (vision_model.config.vision_config
                     if hasattr(vision_model.config, "vision_config") else vision_model.config)
    side = vision_config.image_size // vision_config.patch_size
    if merge_patches < 1 or side % merge_patches:
        raise ValueError(f"merge_patches={merge_patches}: the tower's {side} x {side} patches "
                         "must split into whole merge_patches x merge_patches blocks")
    config = LlavaConfig(
        vision_config=vision_config.to_dict(), text_config=lm.config.to_dict(),
        image_token_index=image_token_id(tokenizer),
        image_seq_length=(side // merge_patches) ** 2,
        projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=vision_feature_layer,
    )
    if merge_patches > 1:
        config.merge_patches = merge_patches
    torch.manual_seed(seed)
    vlm = (LlavaWithMergedPatches if merge_patches > 1 else LlavaForConditionalGeneration)(config)
    vlm.model.vision_tower.load_state_dict(tower.state_dict())
    vlm.model.language_model.load_state_dict(lm.model.state_dict())
    vlm.lm_head.load_state_dict(lm.lm_head.state_dict())
    vlm.config.pad_token_id = tokenizer.pad_token_id
    vlm.generation_config.pad_token_id = tokenizer.pad_token_id
    vlm.generation_config.eos_token_id = end_of_turn_id(tokenizer)
    return vlm


def load_vlm(checkpoint, device="cpu"):
    """``(model, image_processor, tokenizer)`` of a LLaVA checkpoint (hub id or folder)."""
    merged = getattr(AutoConfig.from_pretrained(checkpoint), "merge_patches", 1) > 1
    model = (LlavaWithMergedPatches if merged else LlavaForConditionalGeneration
             ).from_pretrained(checkpoint)
    processor = AutoImageProcessor.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prepare_tokenizer(tokenizer)  # a pad token and a chat template where the checkpoint has none
    fit_embeddings(model, tokenizer)
    if model.config.image_token_index != image_token_id(tokenizer):
        raise ValueError(f"{checkpoint}: the model's image_token_index is "
                         f"{model.config.image_token_index} but the tokenizer's <image> token is "
                         f"{image_token_id(tokenizer)}; the tokenizer does not belong to the model")
    return model.to(device), processor, tokenizer


def save_vlm(folder, model, processor, tokenizer) -> None:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
