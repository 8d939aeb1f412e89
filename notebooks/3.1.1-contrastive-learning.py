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
# # 3.1.1 Contrastive learning: CLIP and InfoNCE (对比学习)
#
# Pre-training (3.1, 预训练阶段) is where a multimodal model gets its basic abilities. The first
# and most influential pre-training objective is **contrastive learning** as CLIP does it: two
# encoders, one for images and one for text, are trained so that an image and *its* caption
# land close together in a shared embedding space while every other caption in the batch is
# pushed away.
#
# Take a batch of N image-caption pairs. Encode all images and all captions, normalise the
# vectors and compare every image with every caption: an N×N matrix of cosine similarities.
# The diagonal holds the N true pairs (✓); the N² − N off-diagonal cells are negatives (✗).
# Training should make the diagonal bright and everything else dark.
#
# In this notebook we train a real `transformers.CLIPModel` (tiny config) on the shapes world,
# watch the matrix change, and measure what the seed's key points claim: the temperature,
# the number of negatives, normalisation. We also look at two things the seed does not
# mention: duplicate captions (false negatives) and SigLIP's sigmoid loss.

# %% tags=["parameters"]
seed = 0  # random seed for the data, the model initialisation and the batches
device = "auto"  # "auto" picks cuda, then mps, then cpu; or name one
threads = 2  # CPU threads for torch (fixed so the printed numbers are reproducible)
output_dir = "../build/interactive"  # the runner sets it;
#   metrics go to output_dir/metrics/3.1.1.json
cache_dir = "../.cache"  # shared artifacts (tokenizer, trained encoders), keyed by their config
clip_checkpoint = ""  # a CLIP checkpoint (hub id or folder) instead of the tiny model,
#   e.g. "openai/clip-vit-base-patch32"
tokenizer_scenes = 2000  # scenes whose text trains the world's BPE tokenizer
train_scenes = 8000  # training scenes (each has 5 caption phrasings)
test_scenes = 300  # held-out scenes for retrieval
image_size = 48  # pixels per side: scenes are rendered at this size (tiny model only)
batch_size = 64  # pairs per batch: N, so N - 1 negatives per image
train_steps = 1800  # optimiser steps of the main run
lr = 3e-3  # peak AdamW learning rate (warmup 5%, cosine decay)
experiment_steps = 150  # steps of each side experiment (batch size, SigLIP, normalisation)
progress = False  # show a tqdm progress bar while training (off in the committed outputs)

# %% [markdown]
# ## Setup
#
# Every notebook of the chapter starts the same way: seed everything, pick the device, fix
# the number of CPU threads (so the numbers printed below are bit-for-bit reproducible on a
# CPU), and load what earlier sections built from the cache.

# %%
import inspect

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from companion import info_nce_loss, siglip_loss
from companion.book import write_metrics
from companion.clip import (ClipRecipe, ContrastiveModel, build_caption_data,
                            evaluate_retrieval, pretrain_clip, publish_clip, sample_batch,
                            similarity_matrix, zero_shot_accuracy)
from companion.losses.contrastive import ClipLoss, SiglipLoss
from companion.models import TinyClipConfig, build_clip, clip_image_size, count_parameters
from companion.plots import (plot_bars, plot_curves, plot_row_softmax, show_images,
                             similarity_heatmap)
from companion.runtime import setup
from companion.tokenizer import world_tokenizer
from companion.train import TrainConfig, train
from companion.world import make_scenes, render_scene

%matplotlib inline
dev = setup(seed=seed, device=device, threads=threads)
metrics = {}

# %% [markdown]
# ## The loss, as the seed writes it
#
# The seed's `info_nce_loss` takes normalised features, builds the logits
# `logits[i, j] = image_i · text_j / τ`, and averages two cross-entropies: each image must pick
# its caption among N (rows), and each caption its image among N (columns). Here is the
# companion's implementation; it normalises the features itself (a no-op on the seed's
# already-normalised input), validates shapes and values, and can spread the target over
# several positives (used further down).

# %%
print(inspect.getsource(info_nce_loss))

# %% [markdown]
# A reader can type the seed's six lines directly. On a random batch they agree with the
# companion's function to floating-point precision: one algorithm, written once, checked.

# %%
def seed_info_nce_loss(image_features, text_features, temperature=0.07):
    logits = torch.matmul(image_features, text_features.T) / temperature
    labels = torch.arange(len(logits), device=logits.device)
    loss_i2t = F.cross_entropy(logits, labels)
    loss_t2i = F.cross_entropy(logits.T, labels)
    return (loss_i2t + loss_t2i) / 2


generator = torch.Generator().manual_seed(seed)
img = F.normalize(torch.randn(16, 32, generator=generator, dtype=torch.float64), dim=-1)
txt = F.normalize(torch.randn(16, 32, generator=generator, dtype=torch.float64), dim=-1)
difference = (seed_info_nce_loss(img, txt) - info_nce_loss(img, txt)).abs().item()
print(f"seed version {seed_info_nce_loss(img, txt).item():.6f}, companion "
      f"{info_nce_loss(img, txt).item():.6f}, |difference| = {difference:.1e}")
assert difference < 1e-12

# %% [markdown]
# ## Data and model
#
# Each training scene comes with several phrasings of its caption; every step samples a
# batch of distinct scenes and one phrasing each. The held-out scenes never appear in
# training. The tokenizer is the world's BPE from section 3.0 (loaded from the cache, or
# trained on the spot if this notebook runs alone). The whole run is declared in one
# `ClipRecipe`; sections 3.1.2 to 3.4 reuse the vision tower it trains, and find it in the
# cache under a key made from this recipe.

# %%
recipe = ClipRecipe(seed=seed, tokenizer_scenes=tokenizer_scenes, train_scenes=train_scenes,
                    image_size=image_size, batch_size=batch_size, steps=train_steps, lr=lr,
                    checkpoint=clip_checkpoint)
tokenizer = None if clip_checkpoint else world_tokenizer(cache_dir, n_scenes=tokenizer_scenes,
                                                         log=None)
sizes = TinyClipConfig(image_size=image_size)
model, processor, tokenizer = build_clip(tokenizer, checkpoint=clip_checkpoint or None,
                                         sizes=sizes, seed=seed)
render_size = clip_image_size(model)  # draw the scenes at the size the model reads
test_scene_list = make_scenes(test_scenes, seed=seed + 1, start_id=10_000_000)
test_data = build_caption_data(test_scene_list, tokenizer, processor, render_size=render_size)
print(f"CLIPModel with {count_parameters(model) / 1e6:.2f} M parameters, images "
      f"{render_size}x{render_size}; {test_data.phrasings} phrasings per scene, "
      f"{len(test_data)} held-out scenes")
print("one caption, two phrasings:", *test_data.captions[0][:2], sep="\n  ")

# %% [markdown]
# ## Before training: the N×N matrix of a real batch
#
# Eight held-out images against their eight captions, through the untrained model. With
# random weights every image looks about equally similar to every caption: no diagonal.

# %%
show_batch = sample_batch(test_data, 8, step=0, seed=seed, phrasing="first")
before = similarity_matrix(model.to(dev), show_batch)
initial = evaluate_retrieval(model, test_data)
metrics.update({f"initial_{k}": v for k, v in initial.items()})
print("held-out retrieval before training:", {k: round(v, 3) for k, v in initial.items()})

# %% [markdown]
# ## Training with a learnable temperature
#
# CLIP learns the temperature: the logits are multiplied by `s = exp(t)` with `t` a parameter
# initialised to `log(1/0.07)` and the scale clamped at 100 (open_clip clamps after every
# optimiser step). `ClipLoss` owns that parameter; `ContrastiveModel` pairs it with the CLIP
# model so that one optimiser trains both. The training loop is the companion's `train`: AdamW,
# linear warmup then cosine decay, gradient clipping, a history of losses and metrics.
# `pretrain_clip` puts these pieces together; its core is three lines:

# %%
source = inspect.getsource(pretrain_clip)
print(source[source.index("    loss = ClipLoss()"):source.index("    return ClipRun")])

# %% [markdown]
# It builds the same model from the same seed as above (so the "before" matrix is its
# starting point), renders and tokenises the training scenes, and trains:

# %% tags=["trained-figures"]
run = pretrain_clip(recipe, tokenizer, device=dev, progress=progress)
model, clip_loss, history, train_data = run.model, run.loss, run.history, run.train_data
train_seconds = run.seconds
publish_clip(cache_dir, recipe, run, log=None)  # for sections 3.1.2 onwards
print(f"{len(train_data)} training scenes x {train_data.phrasings} phrasings; "
      f"final loss {history.last('loss', window=50):.3f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
plot_curves({"InfoNCE": history.series("loss")}, "Training loss", ylabel="loss", ax=axes[0],
            smooth=10)
plot_curves({"τ = 1/s": history.series("temperature")}, "The learned temperature",
            ylabel="temperature τ", ax=axes[1])
axes[1].axhline(0.07, color="gray", ls="--", lw=1)
axes[1].axhline(0.01, color="tab:red", ls=":", lw=1)
axes[1].text(0, 0.072, "init 0.07", fontsize=8)
axes[1].text(0, 0.011, "clamp: s ≤ 100", fontsize=8, color="tab:red")
plt.show()

# %% [markdown]
# The temperature falls during training: as the encoders get better, the model can afford
# sharper distributions, and a sharper softmax gives lower loss on pairs it already ranks
# correctly.

# %% tags=["trained-figures"]
final = evaluate_retrieval(model, test_data)
metrics.update({f"heldout_{k}": v for k, v in final.items()})
metrics["final_temperature"] = clip_loss.temperature
metrics["train_steps"] = train_steps
print(f"final temperature {clip_loss.temperature:.4f} (scale {1 / clip_loss.temperature:.1f})")
print("held-out retrieval after training:", {k: round(v, 3) for k, v in final.items()})

# %% [markdown]
# Recall@k counts a query as solved when a correct item is among the top k. Image→text R@1 is
# the share of held-out images whose best-scoring caption, among the distinct caption texts
# of all held-out scenes (every phrasing), is one of the image's own captions. Identical
# texts are one candidate: a caption without positions ("one shape: a large red circle.")
# can be written for several scenes, is true of all of them, and has one embedding, so no
# ranking could prefer one copy over another.
#
# ## After training: the diagonal lights up

# %% tags=["trained-figures"]
after = similarity_matrix(model, show_batch)
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
similarity_heatmap(before, "Before training", ax=axes[0], vmin=-1, vmax=1)
similarity_heatmap(after, "After training", ax=axes[1], vmin=-1, vmax=1)
plt.show()
diag = after.diag().mean().item()
off = (after.sum() - after.diag().sum()).item() / (after.numel() - after.shape[0])
print(f"mean cosine similarity after training: diagonal {diag:.3f}, off-diagonal {off:.3f}")
print(f"before training: diagonal {before.diag().mean().item():.3f}")

# %%
fig = show_images([render_scene(s, 128) for s in test_scene_list[:4]],
            [test_data.captions[i][0] for i in range(4)], columns=4,
                  suptitle="The first four images of the batch above, with their captions")

# %% [markdown]
# ## Temperature: how sharp is each row's softmax?
#
# InfoNCE reads each row of the matrix through a softmax of `similarity / τ`. Drag the
# slider: at τ = 1 the cosine similarities (all between −1 and 1) give an almost flat
# distribution and the loss can hardly tell the positive from the negatives; at τ = 0.07 the
# positive takes most of the mass; at τ → 0 the softmax becomes an argmax and the gradient
# concentrates on the hardest negative. (The widget needs a live kernel; the cell after it
# draws the same function at fixed values.)

# %% tags=["nbval-ignore-output"]
from companion.widgets import temperature_slider

slider = temperature_slider(after, rows=4)

# %% tags=["trained-figures"]
for tau in (1.0, 0.07, 0.01):
    probs = torch.softmax(after.double() / tau, dim=1)
    print(f"τ = {tau:<5} mean p(positive) = {probs.diag().mean().item():.3f}")
fig = plot_row_softmax(after, 0.07, rows=4)

# %% [markdown]
# ## Zero-shot classification by prompts
#
# A contrastive model classifies without a classifier: write text prompts for each class and
# pick the class whose prompts are closest to the image. Here the classes are the four shapes,
# on held-out scenes with a single object, and each class has one prompt per colour, size and
# position of that shape. CLIP averages a class's prompt embeddings ("prompt ensembling"
# over its 80 templates); the alternative scores a class by its best prompt. Which works
# depends on how much the prompts differ in things other than the class:

# %% tags=["trained-figures"]
from companion.clip import zero_shot_prompts
from companion.world import SHAPES

single = [i for i, s in enumerate(test_scene_list) if len(s.objects) == 1]
labels = torch.tensor([SHAPES.index(test_scene_list[i].objects[0].shape) for i in single])
prompts = [zero_shot_prompts(shape) for shape in SHAPES]
for reduction in ("mean", "max"):
    accuracy = zero_shot_accuracy(model, tokenizer, test_data.pixel_values[single], labels,
                                  prompts, reduction=reduction)
    metrics[f"zero_shot_shape_accuracy_{reduction}"] = accuracy
    print(f"zero-shot shape accuracy, {reduction} over {len(prompts[0])} prompts per class: "
          f"{accuracy:.3f} on {len(single)} single-object scenes (chance {1 / len(SHAPES):.2f})")

# %% [markdown]
# Averaging 108 captions that differ in colour, size and position can blur the one word
# that differs between classes, while the best single prompt keeps it: compare the two
# numbers above. CLIP's templates ("a photo of a
# {}", "a blurry photo of a {}") vary only in style, which averaging removes.

# %% [markdown]
# ## More negatives: batch size
#
# The seed says more negatives help and CLIP used a batch of 32,768. Each image in a batch of
# N is contrasted with N − 1 captions. We train the same model from scratch for the same
# number of steps at several batch sizes and measure held-out R@1. (A larger batch also shows
# the model more pairs per step, so this mixes two effects, as CLIP's own recipe does.)

# %% tags=["trained-figures"]
def short_run(batch, steps, loss_module=None, multi_positive=False, phrasing="random",
              run_seed=seed):
    """Train a fresh tiny CLIP for `steps` at batch size `batch`; return (model, history)."""
    fresh, _, _ = build_clip(tokenizer, checkpoint=clip_checkpoint or None, sizes=sizes,
                             seed=run_seed)
    module = loss_module if loss_module is not None else ClipLoss()
    pair = ContrastiveModel(fresh, module, multi_positive=multi_positive).to(dev)
    cfg = TrainConfig(steps=steps, lr=lr, weight_decay=0.1, log_every=0)
    clamp = getattr(module, "clamp_", None)
    hist = train(pair, pair,
                 lambda s: sample_batch(train_data, batch, s, seed=run_seed + 1, phrasing=phrasing),
                 cfg, after_step=(lambda _: clamp()) if clamp else None, device=dev)
    return fresh, hist


batch_results = {}
for n in (8, 32, 64):
    trained, _ = short_run(n, experiment_steps)
    batch_results[n] = evaluate_retrieval(trained, test_data)["i2t_R@1"]
    print(f"batch {n:>4} ({n - 1:>3} negatives per image): "
          f"held-out i2t R@1 = {batch_results[n]:.3f}")
metrics["batch_size_R@1"] = {str(k): v for k, v in batch_results.items()}
fig = plot_bars({f"N = {k}": v for k, v in batch_results.items()},
                f"Held-out image→text R@1 after {experiment_steps} steps", "R@1")

# %% [markdown]
# ## Why normalise the features?
#
# The seed computes *cosine* similarity: features are L2-normalised before the dot product.
# Without it the logits grow with the vectors' lengths, so the model can lower the loss by
# inflating norms instead of aligning directions, and τ no longer controls how sharp the
# softmax is. The same run as N = 64 above, with `normalize=False`:

# %% tags=["trained-figures"]
raw_model, raw_hist = short_run(64, experiment_steps, loss_module=ClipLoss(normalize=False))
raw_r1 = evaluate_retrieval(raw_model, test_data)["i2t_R@1"]
with torch.no_grad():
    from companion.clip import image_embeddings
    norms = image_embeddings(raw_model, test_data.pixel_values[:256].to(dev)).norm(dim=-1)
metrics["normalize_R@1"] = {"normalised": batch_results[64], "unnormalised": raw_r1}
print(f"normalised features:   held-out i2t R@1 = {batch_results[64]:.3f}")
print(f"unnormalised features: held-out i2t R@1 = {raw_r1:.3f}; image feature norms "
      f"{norms.min().item():.1f} to {norms.max().item():.1f}")

# %% [markdown]
# ## Duplicate captions are false negatives
#
# InfoNCE assumes exactly one positive per row. When two images in a batch have the same
# caption, the other image's caption is scored as a *negative* although it is a correct
# match, and the loss pushes apart things that belong together. The short phrasing
# "two shapes: a small red circle and a large blue square." leaves out positions, so many scenes
# share it: we train on that phrasing only, once with the plain target and once with the
# multi-positive target, which spreads each row's target over every identical caption.

# %% tags=["nbval-ignore-output"]
SHORT = 1  # index of the "N shapes: ..." phrasing, which omits positions
probe = sample_batch(train_data, batch_size, step=0, seed=seed, phrasing=SHORT)
ids = probe["caption_ids"]
shared = int((ids[:, None] == ids[None, :]).sum().item() - len(ids))
print(f"example caption: {train_data.captions[0][SHORT]!r}")
print(f"in a batch of {batch_size} with this phrasing, "
      f"{shared} off-diagonal cells are true matches")

dup_results = {}
for name, multi in (("plain target", False), ("multi-positive", True)):
    trained, _ = short_run(64, experiment_steps, multi_positive=multi, phrasing=SHORT)
    dup_results[name] = evaluate_retrieval(trained, test_data, phrasing=SHORT)["i2t_R@1"]
    print(f"{name:>15}: held-out i2t R@1 on short captions = {dup_results[name]:.3f}")
metrics["false_negatives_R@1"] = dup_results
change = dup_results["multi-positive"] - dup_results["plain target"]
print(f"multi-positive minus plain: {change:+.3f} R@1, with {shared} duplicate cells per "
      f"batch of {batch_size} (N² = {batch_size ** 2} cells): few duplicates, little to fix")

# %% [markdown]
# On a single batch, with the main model: the plain loss charges the model for the mass it
# puts on duplicates; the multi-positive loss does not.

# %% tags=["trained-figures"]
with torch.no_grad():
    from companion.clip import text_embeddings
    probe_img = image_embeddings(model, probe["pixel_values"].to(dev)).float()
    probe_txt = text_embeddings(model, probe["input_ids"].to(dev),
                                probe["attention_mask"].to(dev)).float()
plain = info_nce_loss(probe_img, probe_txt, clip_loss.temperature).item()
multi = info_nce_loss(probe_img, probe_txt, clip_loss.temperature, positive_ids=ids.to(dev)).item()
print(f"plain InfoNCE {plain:.4f}, multi-positive {multi:.4f}")

# %% [markdown]
# ## SigLIP: a sigmoid instead of a softmax
#
# SigLIP replaces the row and column softmaxes with an independent binary decision per cell:
# `−log σ(z_ij (s·x_i·y_j + b))` with `z = +1` on the diagonal and −1 elsewhere, summed over
# the N² cells and divided by N. No cell competes with the others, so the loss needs no
# all-to-all normalisation (which is what makes softmax CLIP expensive across devices). Same
# budget as the N = 64 InfoNCE run above:

# %%
print(inspect.getsource(siglip_loss))

# %% tags=["trained-figures"]
sig_hist_module = SiglipLoss()
sig_model, sig_hist = short_run(64, experiment_steps, loss_module=sig_hist_module)
sig_r1 = evaluate_retrieval(sig_model, test_data)["i2t_R@1"]
metrics["siglip_vs_infonce_R@1"] = {"infonce": batch_results[64], "siglip": sig_r1}
print(f"InfoNCE: held-out i2t R@1 = {batch_results[64]:.3f}")
print(f"SigLIP:  held-out i2t R@1 = {sig_r1:.3f}")
print(f"SigLIP's learned scale {sig_hist_module.logit_scale.detach().exp().item():.1f}, "
      f"bias {sig_hist_module.logit_bias.detach().item():.2f}")

# %% [markdown]
# SigLIP starts with the bias at −10, so every cell starts out as a confident "no match".
# That prior comes from the paper's batches of tens of thousands, where a cell is a positive
# with probability about 1/32,000 (log-odds ≈ −10). In a batch of 64 the prior log-odds of a
# positive are log(1/63) ≈ −4.1, so the start is far off and the short run above spends its
# steps climbing out of it: compare the numbers, and rerun with a larger `experiment_steps`
# (or `SiglipLoss(bias=-4.0)`) to see whether the gap closes.
#
# ## CLIP's batch sizes on one machine: the tiled loss
#
# The plain loss holds the N×N logit matrix, its softmax and its gradient: memory grows with
# N². `tiled_info_nce_loss` computes the same value and gradients one strip of rows at a
# time, merging log-sum-exps, and recomputes each strip in the backward pass, so its memory
# grows with N only. `benchmarks/contrastive_loss_memory.py` measures both (each size in its
# own process, D = 256) together with the time the unavoidable matrix products take (the
# GEMM floor); its saved results:

# %%
import json
from pathlib import Path

from companion import tiled_info_nce_loss
from companion.plots import plot_loss_memory

bench = json.loads(Path("../benchmarks/results/contrastive_loss_memory.json").read_text())
for row in bench["results"]:
    if "skipped" in row:
        print(f"{row['method']:>10} N={row['n']:>6}: skipped ({row['skipped']})")
    else:
        print(f"{row['method']:>10} N={row['n']:>6}: {row['time_s']:6.2f} s, "
              f"loss memory {row['loss_mib']:7.1f} MiB, peak {row['peak_mib']:7.1f} MiB")
fig = plot_loss_memory(bench["results"])

# %% [markdown]
# And on a live batch, the tiled loss agrees with the plain one:

# %%
g = torch.Generator().manual_seed(seed)
x, y = torch.randn(1000, 64, generator=g), torch.randn(1000, 64, generator=g)
plain_value = info_nce_loss(x, y, 0.07).item()
tiled_value = tiled_info_nce_loss(x, y, 0.07, tile_size=128).item()
print(f"plain {plain_value:.6f}, tiled {tiled_value:.6f} (N = 1000, tiles of 128 rows)")

# %% [markdown]
# ## Summary
#
# Measured in this run (the numbers above, also written to the metrics file):

# %% tags=["trained-figures"]
write_metrics("3.1.1", metrics, output_dir)
print(f"held-out image→text R@1 {metrics['heldout_i2t_R@1']:.3f} (before training "
      f"{metrics['initial_i2t_R@1']:.3f}), R@5 {metrics['heldout_i2t_R@5']:.3f}; "
      f"text→image R@1 {metrics['heldout_t2i_R@1']:.3f}")
print(f"learned temperature {metrics['final_temperature']:.4f}; zero-shot shape accuracy "
      f"{metrics['zero_shot_shape_accuracy_max']:.3f} (best prompt), "
      f"{metrics['zero_shot_shape_accuracy_mean']:.3f} (prompt average)")

# %% tags=["nbval-ignore-output"]
print(f"main training run: {train_seconds:.1f} s for {train_steps} steps on {dev.type}")
