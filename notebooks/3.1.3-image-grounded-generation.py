# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3.1.3 Image-grounded text generation (图文生成)
#
# Contrastive learning (3.1.1) and matching (3.1.2) *score* image-text pairs. The third
# pre-training objective makes the model *write*: given an image and the beginning of a
# caption ("A dog is"), predict the next token ("running"). It is the objective every
# multimodal LLM is trained with, and the one instruction tuning (3.2) builds on.
#
# The seed's `generation_loss` has four steps: encode the image, map its features through a
# connector to *vision tokens*, put them in front of the caption's tokens, and train the
# causal language model to predict each caption token from everything before it. Here the
# model is a real `LlavaForConditionalGeneration`: the CLIP vision tower of 3.1.1 (frozen),
# LLaVA-1.5's projector as the connector, and a small Llama pretrained on the world's text.

# %% tags=["parameters"]
seed = 0  # random seed for data, initialisation and batches
device = "auto"  # "auto" picks cuda, then mps, then cpu; or name one
threads = 2  # CPU threads for torch (fixed so the printed numbers are reproducible)
output_dir = "../build/interactive"  # the runner sets it; metrics: output_dir/metrics/3.1.3.json
cache_dir = "../.cache"  # shared artifacts (tokenizer, CLIP of 3.1.1, text-pretrained LM of 3.2)
tokenizer_scenes = 2000  # scenes whose text trains the world's BPE (as in 3.0 and 3.1.1)
clip_train_scenes = 8000  # the 3.1.1 CLIP recipe (must match 3.1.1 to reuse its cached model)
clip_steps = 1800  # steps of the 3.1.1 CLIP recipe
clip_batch_size = 64  # batch size of the 3.1.1 CLIP recipe
lm_scenes = 20000  # the text-only LM recipe (as in 3.2, so the cached LM is shared)
lm_steps = 2000  # optimiser steps of the LM's text-only pretraining
train_scenes = 3000  # training images, each with its canonical caption
test_scenes = 100  # held-out images whose generated captions the judge scores
steps = 800  # optimiser steps of caption training (projector + LM; vision frozen)
lr = 2e-3  # peak AdamW learning rate (warmup 3%, cosine decay)
batch_size = 32  # image-caption pairs per step
max_new_tokens = 48  # longest generated caption, in tokens
sample_temperature = 0.7  # temperature of the sampled captions shown beside the greedy ones
progress = False  # show a tqdm progress bar while training (off in the committed outputs)
clip_checkpoint = ""  # a CLIP checkpoint whose vision tower to use instead of 3.1.1's tiny CLIP
lm_checkpoint = ""  # a causal LM checkpoint (with its tokenizer) instead of the tiny Llama

# %% [markdown]
# ## Setup

# %%
import inspect
import time

import torch

from companion.book import write_metrics
from companion.clip import ClipRecipe, pixel_values_for, pretrained_clip
from companion.evaluate import caption_quality
from companion.losses.generation import (IGNORE_INDEX, caption_inputs, generate_captions,
                                         generation_loss)
from companion.models import build_clip
from companion.plots import plot_curves, show_images
from companion.runtime import setup
from companion.stages import apply_stage
from companion.tokenizer import world_tokenizer
from companion.train import TrainConfig, train
from companion.vlm import (LMRecipe, build_lm, build_vlm, image_seq_length, image_token_id,
                           pretrained_lm)
from companion.world import canonical_caption, make_scenes, render_scene

%matplotlib inline
dev = setup(seed=seed, device=device, threads=threads)
metrics = {}

# %% [markdown]
# ## The loss
#
# The companion's `generation_loss` follows the seed's four steps; inside
# `LlavaForConditionalGeneration` the vision tower encodes the images, the projector makes
# the vision tokens, and they replace the image placeholders at the front of the sequence:

# %%
print(inspect.getsource(generation_loss))

# %% [markdown]
# The labels decide what is learned. The sequence is `[vision tokens] <s> caption </s>`;
# only the caption and its closing `</s>` carry a label, everything else is -100 (ignored).
# The labels are *not* shifted here: the model shifts them once inside its loss, so the
# output at position t is scored against the token at t + 1. Shifting them here as well
# would silently train the model to predict two tokens ahead.

# %%
if lm_checkpoint:  # the LM's own tokenizer, given an <image> token (embeddings grown to match)
    lm, tokenizer = build_lm(checkpoint=lm_checkpoint)
else:
    tokenizer = world_tokenizer(cache_dir, n_scenes=tokenizer_scenes, log=None)
image_id = image_token_id(tokenizer)
example = caption_inputs(tokenizer, ["a small red circle at the top left."], 4, image_id)
print(f"{'position':>8}  {'input token':<14} label")
for position, (token, label) in enumerate(zip(example["input_ids"][0].tolist(),
                                             example["labels"][0].tolist())):
    shown = tokenizer.decode([label]) if label != IGNORE_INDEX else "-100"
    print(f"{position:>8}  {tokenizer.decode([token])!r:<14} {shown!r}")
print("(4 vision tokens here for brevity; the model below uses one per image patch)")

# %% [markdown]
# Written out in plain torch, the loss the model computes from its logits takes three steps.
# Shift by one: the logits at position t (all but the last) are scored against the label at
# t + 1 (all but the first). Keep the positions whose label is not -100. Average their
# cross-entropy, minus the log of the probability the softmax gives the right token. (The
# check against `generation_loss` comes once the model below is trained, on its logits for
# held-out captions.)

# %%
def caption_loss_by_hand(logits, labels):
    """Next-token cross-entropy over the caption's positions, the model's own loss."""
    predictions, targets = logits[:, :-1, :], labels[:, 1:]  # output at t predicts t + 1
    scored = targets != IGNORE_INDEX  # not the vision tokens, <s> or the padding
    log_probs = torch.log_softmax(predictions[scored].float(), dim=-1)
    return -log_probs.gather(1, targets[scored].unsqueeze(1)).mean()

# %% [markdown]
# ## Model and data
#
# The vision tower comes from 3.1.1 and the LM from its text-only pretraining (both from the
# cache, or built now if this notebook runs alone); the projector is new. The vision tower
# stays frozen; the projector and the LM learn.

# %%
clip_recipe = ClipRecipe(seed=seed, tokenizer_scenes=tokenizer_scenes,
                         train_scenes=clip_train_scenes, steps=clip_steps,
                         batch_size=clip_batch_size)
if clip_checkpoint:
    clip, processor, _ = build_clip(checkpoint=clip_checkpoint)
else:
    clip, processor, _ = pretrained_clip(cache_dir, clip_recipe, device=dev, log=None)
if not lm_checkpoint:
    lm, _ = pretrained_lm(cache_dir, tokenizer,
                          LMRecipe(seed=seed, tokenizer_scenes=tokenizer_scenes,
                                   scenes=lm_scenes, steps=lm_steps),
                          device=dev, log=None)
vlm = build_vlm(clip, lm, tokenizer, seed=seed).to(dev)
counts = apply_stage(vlm, "stage2")
n_image = image_seq_length(vlm)
size = vlm.config.vision_config.image_size
print(f"trainable: {', '.join(f'{p} {n / 1e6:.3f} M' for p, n in counts.items() if n)}; "
      f"one image = {n_image} vision tokens")

train_list = make_scenes(train_scenes, seed=seed + 4, start_id=50_000_000)
test_list = make_scenes(test_scenes, seed=seed + 5, start_id=60_000_000)
train_pixels = pixel_values_for(processor, [render_scene(s, size) for s in train_list])
test_pixels = pixel_values_for(processor, [render_scene(s, size) for s in test_list])
train_captions = [canonical_caption(s) for s in train_list]
print(f"{len(train_list)} training images with captions, {len(test_list)} held-out images")

# %% [markdown]
# ## Before training
#
# With a random projector the LM receives vision tokens it cannot read. It still writes
# fluent captions (it learned the language from text), but they are not about the image.
# The judge scores every fact a caption states (size, colour, shape and region of each
# object; the word and its position): precision is the share of stated facts that are true,
# recall the share of the scene's facts that were stated, and a caption *hallucinates* when
# it mentions something that is not there.

# %% tags=["trained-figures"]
def judge(pixels, scenes, **kwargs):
    captions = []
    for start in range(0, len(scenes), 64):
        captions += generate_captions(vlm, tokenizer, pixels[start:start + 64], n_image,
                                      image_id, max_new_tokens=max_new_tokens, **kwargs)
    return captions, caption_quality(scenes, captions)


before_captions, before = judge(test_pixels, test_list)
metrics["before"] = before
print({k: round(v, 3) for k, v in before.items()})

# %% [markdown]
# ## Training

# %% tags=["trained-figures"]
def next_batch(step):
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    rows = torch.randint(len(train_list), (batch_size,), generator=generator)
    texts = caption_inputs(tokenizer, [train_captions[r] for r in rows.tolist()], n_image, image_id)
    return {"images": train_pixels[rows], "texts": texts}


config = TrainConfig(steps=steps, lr=lr, weight_decay=0.0, warmup_fraction=0.03,
                     log_every=max(1, steps // 4), progress=progress)
start = time.perf_counter()
history = train(vlm, lambda batch: generation_loss(vlm, batch["images"], batch["texts"]),
                next_batch, config, device=dev)
train_seconds = time.perf_counter() - start
fig = plot_curves({"caption loss": history.series("loss")},
                  "Image-grounded generation: training loss", ylabel="cross-entropy per token",
                  smooth=10)

# %% [markdown]
# The loss written out above, on a real batch: the trained model's logits for the first 16
# held-out images with their captions (no gradients, nothing in the model changes). The
# function of a few lines and `generation_loss`, the loss the model was trained with, give
# the same number:

# %% tags=["trained-figures"]
with torch.no_grad():  # (training left the model in eval mode)
    held_texts = {key: value.to(dev) for key, value in caption_inputs(
        tokenizer, [canonical_caption(s) for s in test_list[:16]], n_image, image_id).items()}
    held_images = test_pixels[:16].to(dev)
    logits = vlm(input_ids=held_texts["input_ids"], attention_mask=held_texts["attention_mask"],
                 pixel_values=held_images).logits
    by_hand = caption_loss_by_hand(logits, held_texts["labels"])
    package_loss = generation_loss(vlm, held_images, held_texts)
print(f"by hand {by_hand.item():.6f}, generation_loss {package_loss.item():.6f}, over "
      f"{int((held_texts['labels'][:, 1:] != IGNORE_INDEX).sum())} caption tokens")
assert torch.allclose(by_hand, package_loss)

# %% [markdown]
# ## After training: held-out images and their captions
#
# Greedy decoding takes the most likely token at every step; sampling draws from the
# softmax at a temperature, which gives varied captions and, at this model size, more
# mistakes.

# %% tags=["trained-figures"]
after_captions, after = judge(test_pixels, test_list)
sampled_captions, sampled = judge(test_pixels, test_list, do_sample=True,
                                  temperature=sample_temperature, seed=seed)
metrics["after_greedy"] = after
metrics[f"after_sampled_t{sample_temperature}"] = sampled
print(f"{'':>22} {'precision':>9} {'recall':>7} {'F1':>6} {'exact':>6} {'hallucinating':>13}")
for name, row in (("before training", before), ("after, greedy", after),
                  (f"after, sampled T={sample_temperature}", sampled)):
    print(f"{name:>22} {row['precision']:>9.3f} {row['recall']:>7.3f} {row['f1']:>6.3f} "
          f"{row['exact']:>6.3f} {row['hallucination_rate']:>13.3f}")

# %%
import textwrap

shown = list(range(6))
labels = [textwrap.fill(f"before: {before_captions[i]}", 38) + "\n"
          + textwrap.fill(f"after: {after_captions[i]}", 38) for i in shown]
fig = show_images([render_scene(test_list[i], 128) for i in shown], labels, columns=3,
                  suptitle="Held-out images: greedy captions before and after training")

# %% [markdown]
# ## Summary
#
# Measured in this run (also written to the metrics file):

# %% tags=["trained-figures"]
metrics.update({"train_steps": steps, "f1_before": before["f1"], "f1_after": after["f1"],
                "hallucination_after": after["hallucination_rate"]})
write_metrics("3.1.3", metrics, output_dir)
print(f"held-out caption F1 {before['f1']:.3f} -> {after['f1']:.3f} (greedy), exact "
      f"{after['exact']:.3f}, hallucination rate {before['hallucination_rate']:.3f} -> "
      f"{after['hallucination_rate']:.3f}")

# %% tags=["nbval-ignore-output"]
print(f"caption training: {train_seconds:.1f} s for {steps} steps on {dev.type}")
