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
# # 3.1.2 Image-text matching (图文匹配, ITM)
#
# A contrastive model (3.1.1) encodes the image and the caption *separately* and compares two
# vectors. That is what makes it fast (embed a million captions once, then one matrix
# product), and also what limits it: the text encoder never sees the image, so everything
# the comparison needs must survive being squeezed into one vector per side. "A red circle
# left of a blue square" and "a blue circle left of a red square" use the same words.
#
# **Image-text matching** asks a different question of one pair at a time: *does this
# caption describe this image?* A fused encoder reads the image and the caption together,
# so every word can look at every part of the picture (cross-modal attention), and a
# two-way head on its [CLS] output answers match / no match. The seed's head is exactly that:
# one linear layer on position 0. BLIP and ALBEF train it next to a contrastive loss and use
# the contrastive similarities to pick **hard negatives**: captions the contrastive model
# confuses with the right one.
#
# In this notebook we measure, on the shapes world:
#
# 1. what the contrastive model of 3.1.1 misses: pairs of captions that differ in exactly
#    one fact (a colour, a shape, a size or a position);
# 2. an ITM model trained with random negatives and one trained with hard negatives, on
#    random pairs and on those fine-grained pairs;
# 3. ITM as a re-ranker of the contrastive model's top-k captions.

# %% tags=["parameters"]
seed = 0  # random seed for the data, the model initialisation and the batches
device = "auto"  # "auto" picks cuda, then mps, then cpu; or name one
threads = 2  # CPU threads for torch (fixed so the printed numbers are reproducible)
output_dir = "../build/interactive"  # the runner sets it;
#   metrics go to output_dir/metrics/3.1.2.json
cache_dir = "../.cache"  # shared artifacts (tokenizer, CLIP of 3.1.1), keyed by their config
tokenizer_scenes = 2000  # scenes whose text trains the world's BPE (as in 3.0 and 3.1.1)
clip_train_scenes = 8000  # the 3.1.1 CLIP recipe (must match 3.1.1 to reuse its cached model)
clip_steps = 1800  # steps of the 3.1.1 CLIP recipe
clip_batch_size = 64  # batch size of the 3.1.1 CLIP recipe
train_scenes = 4000  # scenes the ITM model trains on (each has 5 caption phrasings)
test_scenes = 300  # held-out scenes: random pairs, fine-grained pairs, re-ranking
batch_size = 32  # positive pairs per ITM step (each adds 2 negatives: 3 x batch_size pairs)
pool_size = 128  # scenes per step that negatives are drawn from (BLIP: the gathered batch)
warm_steps = 300  # shared first stage, random negatives: learn to read the pair at all
steps = 200  # second stage, run twice from the same start: random vs hard negatives
lr = 1e-3  # peak AdamW learning rate of each stage (warmup 5%, cosine decay)
mining_temperature = 0.03  # hard negatives: softmax(cosine / this); smaller = harder
fusion_width = 64  # hidden size of the fused encoder (a BertModel)
fusion_layers = 2  # transformer layers of the fused encoder
image_pool = 2  # average 2x2 neighbouring patches into one image token (36 -> 9 tokens)
rerank_k = 10  # how many contrastive candidates ITM re-scores per image
rerank_itc_temperature = 0.015  # re-ranking score: ITM log-odds + cosine / this
#   (CLIP's learned τ is about 0.015)
progress = False  # show a tqdm progress bar while training (off in the committed outputs)
clip_checkpoint = ""  # a CLIP checkpoint (hub id or folder) instead of 3.1.1's,
#   e.g. "openai/clip-vit-base-patch32"

# %% [markdown]
# ## Setup

# %%
import copy
import inspect
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from companion.book import write_metrics
from companion.clip import ClipRecipe, build_caption_data, pretrained_clip, sample_batch
from companion.clip import similarity_matrix
from companion.losses.matching import ITMHead, sample_hard_negatives
from companion.matching import (CHANGES, FusionConfig, ITMModel, caption_truth,
                                evaluate_fine_grained, evaluate_itm, fine_grained_pairs,
                                itm_batch, rerank, train_itm)
from companion.models import build_clip, clip_image_size, count_parameters
from companion.plots import plot_curves, show_images
from companion.runtime import setup
from companion.tokenizer import world_tokenizer
from companion.train import TrainConfig
from companion.world import make_scenes, render_scene

%matplotlib inline
dev = setup(seed=seed, device=device, threads=threads)
metrics = {}

# %% [markdown]
# ## The seed's head
#
# The ITM head is a linear two-way classifier on the fused encoder's first output position
# ([CLS]). The companion's `ITMHead` is the seed's, plus input checks:

# %%
print(inspect.getsource(ITMHead))

# %% [markdown]
# Typed as the seed writes it, with the same weights, it gives the same logits:

# %%
class SeedITMHead(torch.nn.Module):
    def __init__(self, hidden_dim):
        super().__init__()
        self.classifier = torch.nn.Linear(hidden_dim, 2)

    def forward(self, multimodal_features):
        cls_output = multimodal_features[:, 0]
        return self.classifier(cls_output)


head, seed_head = ITMHead(16), SeedITMHead(16)
seed_head.load_state_dict(head.state_dict())
features = torch.randn(4, 7, 16, generator=torch.Generator().manual_seed(seed))
difference = (head(features) - seed_head(features)).abs().max().item()
print(f"max |difference| between the seed's head and the companion's: {difference:.1e}")
assert difference == 0.0

# %% [markdown]
# ## The contrastive model and the data
#
# The CLIP of 3.1.1 comes from the cache (trained there; trained now if this notebook runs
# alone). The ITM model trains on scenes with all their caption phrasings; the held-out
# scenes are new.

# %%
tokenizer = world_tokenizer(cache_dir, n_scenes=tokenizer_scenes, log=None)
clip_recipe = ClipRecipe(seed=seed, tokenizer_scenes=tokenizer_scenes,
                         train_scenes=clip_train_scenes, steps=clip_steps,
                         batch_size=clip_batch_size)
if clip_checkpoint:  # its own image processor and tokenizer come with it
    clip, processor, tokenizer = build_clip(checkpoint=clip_checkpoint)
    clip = clip.to(dev).eval()
else:
    clip, processor, tokenizer = pretrained_clip(cache_dir, clip_recipe, device=dev, log=None)
render_size = clip_image_size(clip)
train_data = build_caption_data(make_scenes(train_scenes, seed=seed), tokenizer, processor,
                                render_size=render_size)
test_scene_list = make_scenes(test_scenes, seed=seed + 1, start_id=10_000_000)
test_data = build_caption_data(test_scene_list, tokenizer, processor, render_size=render_size)
train_truth, test_truth = caption_truth(train_data), caption_truth(test_data)
print(f"{len(train_data)} training scenes, {len(test_data)} held-out scenes, "
      f"{test_data.phrasings} phrasings each")

# %% [markdown]
# ## What contrastive similarity misses
#
# For every held-out scene, `fine_grained_negative` writes the scene's caption with exactly
# one fact changed: one object's colour, shape or size replaced, or the object moved to a
# free cell. The world's own caption writer phrases it, so the false caption reads exactly
# like a true one. The four kinds of change take turns:

# %%
pairs = fine_grained_pairs(test_scene_list, seed=seed)
for _, true_caption, false_caption, change in pairs[:4]:
    print(f"{change:>8}:  true  {true_caption}\n{'':>10} false {false_caption}")
fig = show_images([render_scene(test_scene_list[p[0]], 128) for p in pairs[:4]],
                  [f"{p[3]} changed" for p in pairs[:4]], columns=4,
                  suptitle="The images of the four pairs above")

# %% [markdown]
# A model *prefers* the true caption when it scores it higher than its false twin. For CLIP
# the score is the cosine similarity of the two embeddings; chance is 0.5:

# %% tags=["trained-figures"]
clip_fine = evaluate_fine_grained(clip, None, tokenizer, test_data.pixel_values, pairs)
metrics["fine_grained_contrastive"] = {c: clip_fine[f"contrastive_{c}"] for c in CHANGES}
metrics["fine_grained_contrastive"]["all"] = clip_fine["contrastive"]
for change in CHANGES:
    print(f"CLIP prefers the true caption, {change:>8} changed: "
          f"{clip_fine[f'contrastive_{change}']:.3f}")
print(f"all {len(pairs)} pairs: {clip_fine['contrastive']:.3f}")

# %% [markdown]
# ## The fused encoder
#
# `ITMModel` puts three `transformers` parts together, the way ALBEF and BLIP put a fusion
# encoder on top of unimodal encoders:
#
# - CLIP's **vision tower** (a frozen copy): the hidden states of its second-to-last layer,
#   the CLS token and the patches, neighbouring 2×2 patches averaged into one token;
# - CLIP's **text tower** (a frozen copy): one state per caption token;
# - a small **`BertModel`** run on `inputs_embeds` = [CLS] + caption tokens + image tokens
#   (token type 0 for text, 1 for the image). This is single-stream fusion as in ViLT:
#   self-attention over the joint sequence lets every word attend to every image token.
#
# and the seed's `ITMHead` on the fused [CLS]. Only the fused encoder and the head train.

# %%
fusion = FusionConfig(hidden_size=fusion_width, layers=fusion_layers,
                      intermediate_size=4 * fusion_width, image_pool=image_pool, init_std=0.1)
torch.manual_seed(seed)
itm = ITMModel(clip, fusion).to(dev)
print(f"ITM model: {count_parameters(itm, trainable_only=True) / 1e6:.3f} M trainable "
      f"parameters, {count_parameters(itm) / 1e6:.3f} M in all (the CLIP towers are frozen)")

# %% [markdown]
# ## Negatives: random and hard
#
# Each step takes `batch_size` positive pairs and, following BLIP, adds for each image a
# wrong caption and for each caption a wrong image: 3 × `batch_size` pairs, one third
# labelled "match". The wrong ones come from a pool of `pool_size` scenes (BLIP draws from
# the batch gathered across all its GPUs). *Random* negatives are uniform over the pool.
# *Hard* negatives are drawn with probability softmax(similarity / τ) over the contrastive
# similarities, so the captions CLIP finds closest are drawn most often. A caption that is
# also true of the image (the same scene drawn twice, or a phrasing without positions that
# fits another scene with the same objects) must never be a negative; the sampler gets an
# exclusion mask and refuses rows it cannot sample:

# %%
print(inspect.getsource(sample_hard_negatives))

# %% [markdown]
# What the two kinds of negative look like for three images of one pool:

# %% tags=["nbval-ignore-output"]
pool = sample_batch(train_data, pool_size, step=0, seed=seed, phrasing="first")
similarity = similarity_matrix(clip, pool, mining_temperature)
generator = torch.Generator().manual_seed(seed)
easy = itm_batch(pool, "random", generator=generator, truth=train_truth, anchors=3)
hard = itm_batch(pool, "hard", similarity, generator, train_truth, anchors=3)


def caption(k):
    ids = pool["input_ids"][k][pool["attention_mask"][k].bool()]
    return tokenizer.decode(ids, skip_special_tokens=True)


for i in range(3):
    print(f"image {i}:  true   {caption(i)}\n"
          f"          random {caption(easy['negative_texts'][i])}\n"
          f"          hard   {caption(hard['negative_texts'][i])}")

# %% [markdown]
# ## Training: random negatives, then random or hard
#
# A fused encoder trained from scratch first has to learn to read the pair at all; on hard
# negatives alone it barely moves in a CPU budget. (BLIP starts from pretrained encoders for
# the same reason.) So both models share a first stage with random negatives; from that
# point one continues with random negatives and the other with hard ones, for the same
# number of steps on the same scenes. The loop is the chapter's `train`; `train_itm` only
# makes the batches and the loss (`itm_loss`, two-way cross-entropy):

# %% tags=["trained-figures"]
def stage(model, negatives, n_steps, stage_seed):
    config = TrainConfig(steps=n_steps, lr=lr, weight_decay=0.01,
                         log_every=max(1, n_steps // 2), progress=progress)
    return train_itm(model, train_data, config, negatives=negatives, clip_model=clip,
                     temperature=mining_temperature, batch_size=batch_size,
                     pool_size=pool_size, seed=stage_seed, device=dev, truth=train_truth)


start = time.perf_counter()
warm_history = stage(itm, "random", warm_steps, seed)
itm_random, itm_hard = itm, copy.deepcopy(itm)
random_history = stage(itm_random, "random", steps, seed + 1)
hard_history = stage(itm_hard, "hard", steps, seed + 1)
train_seconds = time.perf_counter() - start
models = {"random negatives": itm_random, "hard negatives": itm_hard}

# %%
def shifted(history, offset):
    x, y = history.series("loss")
    return [s + offset for s in x], y


fig = plot_curves({"first stage (random)": warm_history.series("loss"),
                   "then random": shifted(random_history, warm_steps),
                   "then hard": shifted(hard_history, warm_steps)},
                  "ITM training loss (3 x batch_size pairs per step)", ylabel="cross-entropy",
                  smooth=10)

# %% [markdown]
# The hard curve sits higher: its negatives are harder to tell from the positives, so the
# same model makes more mistakes on them. The loss on a harder task is not a measure of
# quality; the held-out pairs are.
#
# ## Results on held-out pairs
#
# *Random pairs*: every held-out image with its caption, a random wrong caption and a random
# wrong image, classified at P(match) = 0.5. *Fine-grained pairs*: the share of pairs where
# ITM gives the true caption a higher P(match) than its one-fact-changed twin, as for CLIP
# above.

# %% tags=["trained-figures"]
results = {}
for name, model in models.items():
    random_pairs = evaluate_itm(model, test_data, seed=seed, truth=test_truth)
    fine = evaluate_fine_grained(clip, model, tokenizer, test_data.pixel_values, pairs)
    results[name] = fine
    metrics[name.replace(" ", "_")] = {
        "random_pairs_accuracy": random_pairs["accuracy"],
        "fine_grained": {"all": fine["itm"], **{c: fine[f"itm_{c}"] for c in CHANGES}},
        "fine_grained_accuracy": fine["itm_accuracy"]}
    print(f"ITM with {name}: random pairs accuracy {random_pairs['accuracy']:.3f}; "
          f"prefers the true caption in {fine['itm']:.3f} of fine-grained pairs "
          f"(CLIP {clip_fine['contrastive']:.3f})")

# %%
groups = ["all", *CHANGES]
bars = {"CLIP (cosine)": [clip_fine["contrastive" if g == "all" else f"contrastive_{g}"]
                          for g in groups]}
for name, fine in results.items():
    bars[f"ITM, {name}"] = [fine["itm" if g == "all" else f"itm_{g}"] for g in groups]
fig, ax = plt.subplots(figsize=(8, 3.4))
width = 0.8 / len(bars)
for k, (label, values) in enumerate(bars.items()):
    ax.bar(np.arange(len(groups)) + (k - (len(bars) - 1) / 2) * width, values, width, label=label)
ax.axhline(0.5, color="gray", ls="--", lw=1)
ax.set_xticks(np.arange(len(groups)), ["all pairs", *[f"{c} changed" for c in CHANGES]])
ax.set_ylim(0, 1)
ax.set_ylabel("prefers the true caption")
ax.set_title(f"Fine-grained pairs ({len(pairs)} held-out scenes; dashed: chance)")
ax.legend(fontsize=8, loc="lower left")
fig.tight_layout()

# %% [markdown]
# Read the bars by kind of change. A random negative almost never differs from the positive
# in a single attribute, so nothing in that training asks the model to check one; hard
# negatives are chosen to be captions that share most words with the positive (the same
# colours and shapes, bound to other objects), which is the skill fine-grained pairs test.
# Hard negatives cost something too: a model trained on them becomes more suspicious of
# easy pairs (compare the random-pairs accuracies above). Positions are the hardest fact at
# this size: the sentence says "at the top left" and the model must find the top-left image
# token and check what is there, two steps that have to be learned together.
#
# ## Re-ranking: the contrastive model shortlists, ITM decides
#
# ITM scores one pair per forward pass, so it cannot search a large collection; the
# contrastive model can. BLIP retrieves by taking CLIP-style top-k candidates and re-scoring
# only those with ITM, adding the two scores. Held-out image→text retrieval over every
# distinct caption of the held-out scenes, with the ITM log-odds alone and with the
# contrastive logit added:

# %% tags=["trained-figures"]
for name, model in models.items():
    alone = rerank(clip, model, test_data, k=rerank_k)
    combined = rerank(clip, model, test_data, k=rerank_k, itc_temperature=rerank_itc_temperature)
    metrics[f"rerank_{name.replace(' ', '_')}"] = {
        "R@1_contrastive": alone["R@1_contrastive"],
        f"R@{rerank_k}_contrastive": alone[f"R@{rerank_k}_contrastive"],
        "R@1_itm": alone["R@1_reranked"], "R@1_itm_plus_contrastive": combined["R@1_reranked"]}
    print(f"{name:>16}: R@1 contrastive {alone['R@1_contrastive']:.3f} "
          f"(R@{rerank_k} {alone[f'R@{rerank_k}_contrastive']:.3f}) -> ITM alone "
          f"{alone['R@1_reranked']:.3f}, ITM + contrastive {combined['R@1_reranked']:.3f}")

# %% [markdown]
# R@k of the contrastive model bounds what any re-ranker of its top k can reach. Whether
# ITM alone improves on the contrastive ranking depends on which model is better at the
# distinctions left among the top k; adding the two scores lets each overrule the other
# only when it is confident.
#
# ## Summary

# %% tags=["trained-figures"]
metrics.update({"train_steps": {"warm": warm_steps, "second_stage": steps},
                "batch_size": batch_size, "pool_size": pool_size,
                "mining_temperature": mining_temperature})
gain = results["hard negatives"]["itm"] - results["random negatives"]["itm"]
metrics["hard_minus_random_fine_grained"] = gain
write_metrics("3.1.2", metrics, output_dir)
print(f"fine-grained pairs: CLIP {clip_fine['contrastive']:.3f}, ITM random negatives "
      f"{results['random negatives']['itm']:.3f}, ITM hard negatives "
      f"{results['hard negatives']['itm']:.3f} (hard - random = {gain:+.3f})")

# %% tags=["nbval-ignore-output"]
print(f"ITM training: {train_seconds:.1f} s for {warm_steps} + 2 x {steps} steps on {dev.type}")
