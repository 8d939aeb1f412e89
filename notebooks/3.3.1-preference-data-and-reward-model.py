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
# # 3.3.1 RLHF, steps 1 and 2: preference data and the reward model (人类反馈强化学习)
#
# An instruction-tuned model answers in the right format, but often says things that are
# not in the image. Supervised data cannot say "this answer is worse than that one"; RLHF
# can. Its three steps, as the seed draws them:
#
# 1. **Preference data.** For an image and a question the model samples several answers; a
#    labeler says which is better (A > B).
# 2. **A reward model** learns a scalar score from those comparisons, trained so that
#    P(A > B) = σ(r(A) − r(B)) (the Bradley-Terry model).
# 3. **PPO** makes the model produce answers the reward model scores higher, with a KL
#    penalty that keeps it close to where it started (notebook 3.3.2). DPO skips the reward
#    model (3.3.3).
#
# Where do a VLM's hallucinations come from? Partly from not seeing well enough, but in real
# models much of it is *learned from the instruction data*. LLaVA-Instruct was written by a
# text-only GPT-4 from captions and boxes; such a writer fills in plausible things that are
# not in the picture, and a model trained on its answers learns to do the same. That learned
# share is what preference tuning can undo (LLaVA-RLHF, RLHF-V and CHAIR-DPO all start from
# it). So this section's starting model is 3.2's recipe trained on machine-written data
# (`annotator_hallucination_rate`), and the first section below measures it beside 3.2's
# own model, trained on clean data.
#
# Our labeler is the shapes world's judge: it knows the scene, so it can score an answer's
# correctness and catch every object, colour, count or word that is not there. A noise knob
# flips some of its choices, standing in for human labelers who disagree.

# %% tags=["parameters"]
seed = 0  # random seed for sampling, labels, initialisation and batches
device = "auto"  # "auto" picks cuda, then mps, then cpu; or name one
threads = 2  # CPU threads for torch (fixed so the printed numbers are reproducible)
output_dir = "../build/interactive"  # the runner sets it; metrics go to
#   output_dir/metrics/3.3.1.json
cache_dir = "../.cache"  # shared artifacts (3.2's model; this section's data and reward model)
upstream = "default"  # the book.toml profile whose 3.2 parameters made the model this notebook
#   starts
#   from (the runner passes the profile it runs; `rlhf.notebook_recipe` reads it)
upstream_changes = {}  # upstream parameters changed from that profile, e.g. {"lm_steps": 500}
#   (the runner passes its -p options here)
annotator_hallucination_rate = 1.0  # share of 3.2's long-form training records written by a
#   careless annotator (0: 3.2's own clean model)
test_scenes = 60  # 3.2's held-out scenes, for the clean and machine-written models side by side
preference_scenes = 400  # scenes whose questions are sampled and labelled (one per task type)
samples = 4  # replies sampled per question for the labeler to compare
max_new_tokens = 32  # longest sampled reply, in tokens
pairs = "all"  # "all" comparisons of a question's replies, or "best_worst" (one pair)
rm_steps = 200  # reward model optimiser steps
rm_lr = 1e-4  # reward model peak learning rate (both reward models)
rm_pooling = "likelihood"  # the reward model PPO uses: "likelihood" (reply log-prob), "last" token
#   or "mean"
rm_factual = None  # it also reads the scene's facts in words (Fact-RLHF); None: yes on the world's
#   pairs, no on preference_json
noise_levels = [0.0, 0.2, 0.4]  # labeler noise (share of flipped choices) for the noise experiment
sft_checkpoint = ""  # a LLaVA checkpoint (hub id or folder) as the starting policy and reference
#   instead of 3.2's model
preference_json = ""  # a preference JSON (TRL fields prompt/chosen/rejected/images) instead of
#   sampling and labelling pairs here
image_folder = ""  # where preference_json's image paths are resolved (default: its folder)

# %% [markdown]
# ## Setup

# %%
import time
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np
import torch

from companion.book import write_metrics
from companion.dpo import reference_logps
from companion.losses.preference import bradley_terry_loss, preference_probability
from companion.preference import flip_preferences, score_pairs
from companion.evaluate import paired_difference
from companion.instruction import instruction_records
from companion.plots import moving_average, plot_task_accuracy
from companion.rlhf import (evaluate_answers, heldout_prompts, preference_data,
                            preference_records, notebook_recipe, reward_model,
                            rlhf_prompts, sft_model, train_reward_model, with_sft)
from companion.runtime import setup

%matplotlib inline
dev = setup(seed=seed, device=device, threads=threads)
metrics = {}
seconds = {}
recipe = notebook_recipe("3.3.1", globals())  # this notebook's and upstream parameters
start = time.perf_counter()
sft, processor, tokenizer = sft_model(cache_dir, recipe, device=dev, log=None)
seconds["3.2 model (loaded or trained)"] = time.perf_counter() - start
pad = tokenizer.pad_token_id

# %% [markdown]
# ## Where the hallucinations come from: clean and machine-written data
#
# `careless_annotations` plays the caption-only writer: in that share of the long-form
# records (descriptions and multi-turn conversations), one answer names an object, colour
# or count that the scene does not have. The short answers (counting, OCR, reasoning,
# grounding) stay clean, as LLaVA-1.5's "academic" data (VQAv2, GQA, OCR-VQA, RefCOCO)
# were labelled by people. One such record, as the model trains on it:

# %%
if recipe.sft.annotator_hallucination_rate > 0 and not recipe.sft_checkpoint:
    _, written_records = instruction_records(recipe.sft)
    written = [r for r in written_records if r.get("annotator")]
    example = written[0]
    turn = example["annotator"]["turn"]
    print(f"{len(written)} of {len(written_records)} training records carry one invented "
          f"answer\n[{example['task']}] {example['conversations'][2 * turn]['value']}\n"
          f"  written: {example['conversations'][2 * turn + 1]['value']}\n"
          f"  true:    {example['annotator']['clean']}")
else:
    print("the starting model was trained on clean data (or is a checkpoint): nothing to show")

# %% [markdown]
# The same recipe, the same steps, the same scenes; only those answers differ. Both models
# answer 3.2's held-out questions (greedy, judged as in 3.2), and the two runs are paired
# answer by answer:

# %% tags=["trained-figures"]
start = time.perf_counter()
heldout = heldout_prompts(recipe, test_scenes, processor, sft.config.vision_config.image_size)
side_by_side = {}
if recipe.sft.annotator_hallucination_rate > 0 and not recipe.sft_checkpoint:
    clean = sft_model(cache_dir, with_sft(recipe, annotator_hallucination_rate=0.0), device=dev,
                      log=None)[0]
    side_by_side["clean data (3.2)"] = evaluate_answers(clean, tokenizer, heldout)
side_by_side["machine-written data"] = evaluate_answers(sft, tokenizer, heldout)
seconds["side by side"] = time.perf_counter() - start
for name, judged in side_by_side.items():
    print(f"{name:>21}: mean task accuracy {judged.mean_task_accuracy():.3f}, "
          f"hallucination rate {judged.hallucination_rate():.3f}")
metrics["sft_hallucination_rate"] = side_by_side["machine-written data"].hallucination_rate()
if len(side_by_side) == 2:
    learned = paired_difference(*side_by_side.values(), key="hallucinated")
    metrics["clean_sft_hallucination_rate"] = learned["control"]
    metrics["learned_hallucination"] = learned["difference"]
    metrics["learned_hallucination_se"] = learned["se"]
    print(f"learned from the data: {learned['difference']:+.3f} ± {learned['se']:.3f} (s.e.)")
    tables = {name: judged.by_task() for name, judged in side_by_side.items()}
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.4))
    plot_task_accuracy(tables, "Held-out task accuracy by type", ax=axes[0])
    plot_task_accuracy(tables, "Held-out hallucination rate by type", key="hallucination_rate",
                       ax=axes[1])
    plt.show()

# %% [markdown]
# The long-form tasks (descriptions, multi-turn) carry the invented answers, and that is
# where the hallucination rate rises most; the short answers were clean, and most of them
# move far less (a model that learned to name extra objects can carry the habit into
# another task's answers). What the model learned from its
# data sits on top of what it cannot see (the clean model's own rate), and it is the part a
# preference between two of its answers can reach.
#
# ## Step 1: the model answers, the labeler compares
#
# For each question (one per task type about each of the section's own scenes) the 3.2 model
# samples several replies at temperature 1. The labeler's *utility* of a reply is the
# judge's score (1 for a correct answer, partial credit for a partly right description or
# box) minus 0.5 if it hallucinates. Every two replies of different utility make a pair
# (InstructGPT likewise ranks K answers and keeps all K(K−1)/2 comparisons); ties teach
# nothing and are dropped. A fifth of the scenes are held out: their pairs only measure the
# reward model.

# %% tags=["nbval-ignore-output"]
start = time.perf_counter()
records = preference_records(cache_dir, recipe, device=dev, log=None)
seconds["sample and label (or load)"] = time.perf_counter() - start
scenes_by_id = rlhf_prompts(recipe, processor, sft.config.vision_config.image_size)[0]
train_records = [r for r in records if r["split"] == "train"]
heldout_records = [r for r in records if r["split"] == "heldout"]
print(f"{len(train_records)} training pairs, {len(heldout_records)} held-out pairs "
      + (f"from {preference_json}" if preference_json else f"from {preference_scenes} scenes"))


def utility(record, side):  # the judge's utility; a file's pairs may carry none
    value = record.get(f"{side}_utility")
    return f"({value:+.2f})" if value is not None else "(unjudged)"


for record in records[:5]:
    print(f"\n[{record.get('task', 'pair')}] {record['prompt'].replace(chr(10), ' ')}\n"
          f"  chosen   {utility(record, 'chosen')}: {record['chosen']}\n"
          f"  rejected {utility(record, 'rejected')}: {record['rejected']}")

# %%
metrics["pairs_train"], metrics["pairs_heldout"] = len(train_records), len(heldout_records)
if all("chosen_hallucinated" in r and "task" in r for r in records):
    chosen_h = np.mean([r["chosen_hallucinated"] for r in records])
    rejected_h = np.mean([r["rejected_hallucinated"] for r in records])
    metrics["chosen_hallucination_rate"] = float(chosen_h)
    metrics["rejected_hallucination_rate"] = float(rejected_h)
    tasks = sorted({r["task"] for r in records})
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(tasks, [sum(r["task"] == t for r in records) for t in tasks])
    ax.set_ylabel("pairs")
    ax.set_title(f"Preference pairs per task; hallucinating replies: chosen {chosen_h:.2f}, "
                 f"rejected {rejected_h:.2f}")
    plt.show()
else:
    print("these pairs carry no judge's labels (task, hallucination): nothing to chart here")

# %% [markdown]
# What the labeler mostly rewards is visible in the last line: a rejected reply hallucinates
# far more often than a chosen one. That is the signal RLHF hopes to turn into a model that
# hallucinates less.
#
# ## The Bradley-Terry model
#
# A reward model gives each reply a number r. Bradley-Terry reads a *difference* of rewards
# as a probability of preference: P(A > B) = σ(r(A) − r(B)). Equal rewards mean a coin flip;
# a difference of 2 means A wins 88% of the time. Only differences matter: adding a
# constant to every reward changes nothing, which is why reward models are often centred.
# The loss is the negative log-likelihood of the labeler's choices,
# −log σ(r_chosen − r_rejected); a margin m asks for r_chosen − r_rejected ≥ m as well.

# %%
delta = torch.linspace(-6, 6, 241)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
axes[0].plot(delta, preference_probability(delta, torch.zeros_like(delta)))
axes[0].axhline(0.5, color="grey", lw=0.5)
axes[0].set(xlabel="r(A) − r(B)", ylabel="P(A > B)", title="Bradley-Terry: σ(r(A) − r(B))")
for margin in (0.0, 1.0):
    losses = [float(bradley_terry_loss(d.reshape(1), torch.zeros(1), margin=margin)) for d in delta]
    axes[1].plot(delta, losses, label=f"margin {margin}")
axes[1].set(xlabel="r_chosen − r_rejected", ylabel="loss", title="−log σ(r_c − r_r − m)")
axes[1].legend()
plt.show()

# %% [markdown]
# ## Step 2: two reward models
#
# The seed's `RewardModel` is the VLM's backbone (vision tower, projector, LM) with a linear
# head that reads the hidden state of the **last** token, started from the 3.2 model. It has
# to find a hallucinated colour by looking at the image *through* the reply, with the same
# eyes as the policy whose mistakes it is meant to catch.
#
# LLaVA-RLHF's answer is the **factually augmented** reward model (Fact-RLHF): it is also
# given what it was denied, the image's ground truth in words (there, the image captions).
# Ours reads the scene's facts as a line of text between the image and the question: the
# same sentence the LM read in place of images in its text-only pretraining, so the reward
# model needs no new input path, and checking a reply becomes reading, not seeing. Its score
# is the reply's log-likelihood under the model (`pooling="likelihood"`, a generative
# reward model), trained with the same Bradley-Terry loss, steps and learning rate as the
# seed's. Both are scored on held-out pairs, where 0.5 is chance, beside two free
# baselines: the 3.2 model's own log-likelihood of each reply (no training at all), without
# and with the facts in its prompt.

# %% tags=["trained-figures"]
def encoded(split, factual):  # the pairs as token ids; factual: the facts in each prompt
    return preference_data(records, split, tokenizer, processor, sft, scenes_by_id,
                           image_folder=recipe.image_root,  # files, when preference_json
                           factual=factual)


plain_heldout, heldout_data = encoded("heldout", False), encoded("heldout", recipe.rm_factual)


def pair_accuracy(chosen, rejected):
    return float((chosen > rejected).float().mean())


def heldout_accuracy(model):
    chosen, rejected = score_pairs(model, heldout_data if model.reads_facts else plain_heldout, pad)
    return pair_accuracy(chosen, rejected), chosen, rejected


start = time.perf_counter()
seed_recipe = replace(recipe, rm_pooling="last", rm_factual=False)  # the seed's reward model
plain_rm, plain_history = reward_model(cache_dir, seed_recipe, device=dev, log=None)
seconds["the seed's reward model (trained or loaded)"] = time.perf_counter() - start
start = time.perf_counter()
rm, rm_history = reward_model(cache_dir, recipe, device=dev, log=None)  # PPO's, in 3.3.2
seconds["PPO's reward model (trained or loaded)"] = time.perf_counter() - start

# %% [markdown]
# The four scorers side by side on the held-out pairs:

# %% tags=["trained-figures"]
facts = "image + facts" if recipe.rm_factual else "image only"
rm_name = f"reward model, {recipe.rm_pooling} head, {facts} (PPO's)"
accuracy, rm_chosen, rm_rejected = heldout_accuracy(rm)
free = pair_accuracy(*reference_logps(sft, plain_heldout, pad))  # no training at all
results = {"3.2 model log-likelihood, image only": free,
           "reward model, last token, image only (the seed's)": heldout_accuracy(plain_rm)[0],
           rm_name: accuracy}
if recipe.rm_factual:
    results["3.2 model log-likelihood, image + facts"] = pair_accuracy(
        *reference_logps(sft, heldout_data, pad))
for name, value in results.items():
    print(f"{name:>58}: held-out pair accuracy {value:.3f}")
metrics["likelihood_pair_accuracy"] = results["3.2 model log-likelihood, image only"]
metrics["plain_rm_pair_accuracy"] = results["reward model, last token, image only (the seed's)"]
metrics["rm_pair_accuracy"] = accuracy  # the reward model 3.3.2's PPO optimises
if recipe.rm_factual:
    metrics["factual_rm_pair_accuracy"] = accuracy
    metrics["factual_likelihood_pair_accuracy"] = results["3.2 model log-likelihood, image + facts"]
half = len(heldout_data) ** 0.5
print(f"({len(heldout_data)} held-out pairs: one standard error of an accuracy near 0.5 is "
      f"about {0.5 / half:.3f})")

# %% [markdown]
# The Bradley-Terry loss written out, on the held-out scores of PPO's reward model just
# computed: the model says the chosen reply wins with probability σ(r_c − r_r), and the loss
# is the mean of −log of that probability, ln 2 ≈ 0.693 for a model that scores both replies
# alike. (It can sit above ln 2 while most pairs are ranked right: these scores are whole-reply
# log-likelihoods, so one pair ranked the wrong way round can cost several nats.) It must equal
# the package's `bradley_terry_loss`:

# %% tags=["trained-figures"]
r_c, r_r = rm_chosen.double(), rm_rejected.double()
p_chosen_wins = 1 / (1 + torch.exp(-(r_c - r_r)))  # σ(r_c − r_r)
bt_by_hand = -torch.log(p_chosen_wins).mean()
bt_package = bradley_terry_loss(rm_chosen, rm_rejected)
assert torch.allclose(bt_by_hand, bt_package.double(), rtol=1e-5, atol=1e-6)
print(f"held-out Bradley-Terry loss: written out {float(bt_by_hand):.4f}, "
      f"bradley_terry_loss {float(bt_package):.4f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
for name, history in (("the seed's (last token)", plain_history), ("PPO's", rm_history)):
    steps = [r["step"] for r in history]
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(*moving_average([r[key] for r in history], max(1, len(steps) // 10), steps),
                label=name)
axes[0].axhline(np.log(2), color="grey", lw=0.5, ls="--")
axes[0].set(xlabel="step", ylabel="Bradley-Terry loss", title="Reward model training (ln 2 dashed)")
axes[1].set(xlabel="step", ylabel="pair accuracy (training batches)",
            title="Training-batch accuracy")
axes[1].legend()
plt.show()

# %% [markdown]
# Is the reward model *calibrated*, i.e. does a reward difference of Δ mean the chosen reply
# wins σ(Δ) of the time, as Bradley-Terry says? Each held-out pair is counted both ways round
# (A, B) and (B, A), binned by r(A) − r(B), and the share of bins where A is the labeler's
# choice is set against the curve (for the reward model PPO uses in 3.3.2).

# %%
diff = torch.cat([rm_chosen - rm_rejected, rm_rejected - rm_chosen]).numpy()
won = np.concatenate([np.ones(len(rm_chosen)), np.zeros(len(rm_chosen))])
edges = np.quantile(diff, np.linspace(0, 1, 9))
centres, shares = [], []
for low, high in zip(edges[:-1], edges[1:]):
    inside = (diff >= low) & (diff <= high)
    centres.append(diff[inside].mean())
    shares.append(won[inside].mean())
grid = np.linspace(diff.min(), diff.max(), 100)
fig, ax = plt.subplots(figsize=(5.5, 3.4))
ax.plot(grid, 1 / (1 + np.exp(-grid)), label="Bradley-Terry σ(Δr)")
ax.plot(centres, shares, "o-", label="held-out pairs (8 bins)")
ax.set(xlabel="r(A) − r(B) (reward model)", ylabel="share where A was chosen",
       title="Calibration of the reward model")
ax.legend()
plt.show()

# %% [markdown]
# ## How much does labeler noise cost?
#
# Human labelers disagree with each other on a sizeable share of comparisons. We flip a share
# of the *training* labels at random and train PPO's reward model again; the held-out pairs
# keep the clean labels.

# %% tags=["trained-figures"]
start = time.perf_counter()
noise_accuracy = {}
for noise in noise_levels:
    if noise == recipe.noise:
        noise_accuracy[noise] = accuracy
        continue
    noisy = preference_data(flip_preferences(records, noise, seed=seed), "train", tokenizer,
                            processor, sft, scenes_by_id, image_folder=recipe.image_root,
                            factual=recipe.rm_factual)
    model, _ = train_reward_model(sft, noisy, pad, recipe.rm_pooling, rm_steps, rm_lr,
                                  seed=seed, device=dev)
    noise_accuracy[noise] = heldout_accuracy(model)[0]
    print(f"noise {noise:.1f}: held-out pair accuracy {noise_accuracy[noise]:.3f}")
seconds["noise experiment"] = time.perf_counter() - start
metrics["rm_accuracy_by_noise"] = {str(k): v for k, v in noise_accuracy.items()}
fig, ax = plt.subplots(figsize=(5.5, 3.4))
ax.plot(list(noise_accuracy), list(noise_accuracy.values()), "o-")
ax.axhline(0.5, color="grey", lw=0.5, ls="--")
ax.set(xlabel="share of flipped training labels", ylabel="held-out pair accuracy",
       title="Reward model accuracy against label noise")
plt.show()

# %% [markdown]
# ## What this run shows
#
# The figures above are this run's. The seed's reward model is the weak link of RLHF at
# this scale: telling a correct reply from a near-identical wrong one ("a red square"
# against "a red circle") means reading the image *through* the reply, and a two-layer LM
# learns that from a few thousand comparisons only slowly, if at all. The 3.2 model's own
# likelihood already carries part of that knowledge for free, the observation DPO (3.3.3)
# builds on.
#
# Given the facts in words, the same backbone ranks far more pairs correctly: a hallucinated
# colour is now a word that contradicts a word in the prompt. The gap between the two reward
# models is the gap between seeing and reading, and it is the reason LLaVA-RLHF augments its
# reward model with the captions. What still caps the factual one is how well its LM reads a
# scene in words at all: 3.2 measures that LM, told each held-out scene in words, and it
# answers well under all of the questions (`text_lm_mean_task_accuracy` in 3.2's metrics).
# A reward model cannot check a reply against facts better than it understands them.
# Notebook 3.3.2 runs PPO against the factual reward model.

# %% tags=["trained-figures"]
write_metrics("3.3.1", metrics, output_dir)
for key, value in metrics.items():
    print(f"{key}: {value if not isinstance(value, float) else round(value, 4)}")

# %% tags=["nbval-ignore-output"]
print("wall times:", {name: f"{value:.0f} s" for name, value in seconds.items()})
