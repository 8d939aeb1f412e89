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
# # 3.3.3 DPO: preference optimisation without a reward model, and the comparison
#
# The seed calls DPO "the simplified alternative to RLHF that needs no separate reward
# model". The trick (Rafailov et al., 2023): the policy that maximises
# E[r] − β·KL(π ‖ π_ref) is π* ∝ π_ref · exp(r/β), so any reward can be written through its
# optimal policy as r = β·log(π*/π_ref) + (a term that cancels in a comparison). Put that
# into the Bradley-Terry loss of 3.3.1 and the reward model disappears:
#
# L = −log σ(β·h),  h = [log π(chosen) − log π_ref(chosen)] − [log π(rejected) − log π_ref(rejected)].
#
# It trains on 3.3.1's preference pairs directly: no sampling during training, no value
# head, no reward model. The reference log-probs never change, so they are computed once.

# %% tags=["parameters"]
seed = 0  # random seed for batches
device = "auto"  # "auto" picks cuda, then mps, then cpu; or name one
threads = 2  # CPU threads for torch (fixed so the printed numbers are reproducible)
output_dir = "../build/interactive"  # the runner sets it; metrics go to
#   output_dir/metrics/3.3.3.json
cache_dir = "../.cache"  # shared artifacts (3.2's model, 3.3.1's data, 3.3.2's PPO policy)
upstream = "default"  # the book.toml profile whose 3.2, 3.3.1 and 3.3.2 parameters made the
#   models this notebook starts from and compares (the runner passes the profile it runs)
upstream_changes = {}  # upstream parameters changed from that profile, e.g. {"ppo_iterations": 120}
#   (the runner passes its -p options here)
dpo_beta = 0.1  # β of the DPO loss (strength of the pull towards the reference)
dpo_lr = 3e-5  # DPO learning rate
dpo_steps = 300  # DPO optimiser steps
dpo_batch_size = 16  # preference pairs per step
ipo_beta = 1.0  # β of the IPO run (its target margin is 1/(2β) in per-token log-ratio)
test_scenes = 60  # 3.2's held-out scenes, for the final comparison
sft_checkpoint = ""  # a LLaVA checkpoint (hub id or folder) as the starting policy and reference
#   instead of 3.2's model
preference_json = ""  # a preference JSON (TRL fields prompt/chosen/rejected/images) instead of
#   3.3.1's judge-labelled pairs
image_folder = ""  # where preference_json's image paths are resolved (default: its folder)
lora_rank = 0  # 0: DPO and IPO tune the LM's weights; > 0: LoRA adapters of this rank instead
#   (needs peft)

# %% [markdown]
# ## Setup

# %% tags=["trained-figures"]
import copy
import time

import matplotlib.pyplot as plt
import torch

from companion.book import write_metrics
from companion.dpo import DPOConfig, reply_logps, train_dpo
from companion.losses.preference import dpo_loss
from companion.lora import LoraSettings, add_lora, merge_lora
from companion.plots import moving_average, plot_dpo_losses, plot_paired_changes
from companion.rlhf import (evaluate_policy, headline_changes, heldout_prompts, ppo_policy,
                            preference_data, preference_records, notebook_recipe,
                            reward_model, rlhf_prompts, sft_model, versus_reference_model)
from companion.runtime import setup
from companion.stages import set_trainable
from companion.widgets import dpo_beta_slider

%matplotlib inline
dev = setup(seed=seed, device=device, threads=threads)
metrics = {}
seconds = {}

# %% [markdown]
# The SFT model, both the policy's starting point and its frozen reference, and 3.3.1's
# preference pairs as token ids, each loaded from the cache (or made now, when this notebook
# runs alone):

# %% tags=["trained-figures"]
recipe = notebook_recipe("3.3.3", globals())  # this notebook's and upstream parameters
start = time.perf_counter()
sft, processor, tokenizer = sft_model(cache_dir, recipe, device=dev, log=None)
records = preference_records(cache_dir, recipe, device=dev, log=None)
seconds["3.2 model and 3.3.1 data (loaded or made)"] = time.perf_counter() - start
image_size = sft.config.vision_config.image_size
scenes_by_id = rlhf_prompts(recipe, processor, image_size)[0]
train_data = preference_data(records, "train", tokenizer, processor, sft, scenes_by_id,
                             image_folder=recipe.image_root)  # files, when preference_json
print(f"{len(train_data)} training pairs " + (f"from {preference_json}" if preference_json else
                                              "(3.3.1's, labelled by the judge)"))

# %% [markdown]
# ## The loss and its variants
#
# Every variant is a function of h alone (`companion.losses.preference.dpo_loss`):
#
# - **sigmoid** (the seed's DPO): −log σ(βh). It never stops pushing h up, only more gently.
# - **label smoothing** ("conservative DPO"): assumes a share ε of labels are flipped, so it
#   stops rewarding ever-larger h: its minimum is finite.
# - **robust**: an unbiased correction for flipped labels (it can go below zero).
# - **hinge**: relu(1 − βh), a margin of 1/β and then nothing.
# - **IPO**: (h − 1/(2β))², a *target* margin instead of "as large as possible", with
#   per-token averaged log-probs. It does not overfit deterministic preferences the way the
#   sigmoid can.
#
# Drag β: small β means a weak pull towards the reference (h must grow a lot before the loss
# is satisfied), large β means the loss saturates after a small change.

# %% tags=["nbval-ignore-output"]
slider = dpo_beta_slider(dpo_beta)

# %% [markdown]
# The same figure, drawn without the widget for the static page:

# %%
fig = plot_dpo_losses(dpo_beta)
plt.show()

# %% [markdown]
# ## Training DPO (and IPO)
#
# The policy starts as a copy of the SFT model (3.3.1's: 3.2's recipe on machine-written
# data) and trains its projector and LM (vision frozen, as in stage 2); the reference is the
# SFT model itself, frozen. Logged per step: the
# loss, the *implicit rewards* β·(log π − log π_ref) of chosen and rejected replies, the
# share of pairs where the chosen one's implicit reward is higher, and their margin.

# %% tags=["trained-figures"]
def dpo_run(loss_type, beta):
    policy = copy.deepcopy(sft)
    if lora_rank:  # only adapters learn in the LM (the reference stays the untouched SFT)
        add_lora(policy, LoraSettings(rank=lora_rank, alpha=2 * lora_rank))
    set_trainable(policy, ("projector", "lm"))  # vision frozen, as in stage 2
    config = DPOConfig(beta=beta, loss_type=loss_type, steps=dpo_steps, lr=dpo_lr,
                       batch_size=dpo_batch_size, seed=seed)
    start = time.perf_counter()
    history = train_dpo(policy, sft, train_data, tokenizer.pad_token_id, config, device=dev)
    seconds[f"{loss_type} training"] = time.perf_counter() - start
    merge_lora(policy)  # a plain model again (nothing to do without LoRA)
    return policy, history


dpo_vlm, dpo_history = dpo_run("sigmoid", dpo_beta)
ipo_vlm, ipo_history = dpo_run("ipo", ipo_beta)

# %% [markdown]
# The DPO loss written out, on sixteen training pairs and the policy just trained: h is how
# much more the policy than the reference prefers the chosen reply to the rejected one, in
# summed log-probs of the reply tokens, and the loss is −log σ(β·h) = log(1 + e^(−β·h)),
# averaged. It must equal the package's `dpo_loss` on the same log-probs:

# %% tags=["trained-figures"]
pairs_batch = train_data.batch(range(min(16, len(train_data))), tokenizer.pad_token_id)
with torch.no_grad():
    pi, ref = reply_logps(dpo_vlm.eval(), pairs_batch), reply_logps(sft.eval(), pairs_batch)
n_pairs = pairs_batch["n_pairs"]
h = (pi[:n_pairs] - ref[:n_pairs]) - (pi[n_pairs:] - ref[n_pairs:])
dpo_by_hand = torch.log1p(torch.exp(-dpo_beta * h.double())).mean()
dpo_package = dpo_loss(pi[:n_pairs], pi[n_pairs:], ref[:n_pairs], ref[n_pairs:], beta=dpo_beta)
assert torch.allclose(dpo_by_hand, dpo_package.double(), rtol=1e-5, atol=1e-6)
print(f"DPO loss on {n_pairs} training pairs: written out {float(dpo_by_hand):.4f}, "
      f"dpo_loss {float(dpo_package):.4f} (ln 2 = 0.6931 at the start, when h = 0)")

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
window = max(1, dpo_steps // 15)


def smooth(history, key):
    steps, values = history.series(key)
    return moving_average(values, window, steps)


for name, history in ((f"DPO (β = {dpo_beta})", dpo_history),
                      (f"IPO (β = {ipo_beta})", ipo_history)):
    axes[0].plot(*smooth(history, "loss"), label=name)
    axes[1].plot(*smooth(history, "reward_accuracy"), label=name)
steps, chosen = smooth(dpo_history, "chosen_reward")
axes[2].plot(steps, chosen, label="chosen")
axes[2].plot(*smooth(dpo_history, "rejected_reward"), label="rejected")
axes[0].set(xlabel="step", ylabel="loss", title="Loss (moving average)")
axes[1].set(xlabel="step", ylabel="share of pairs", title="Implicit reward accuracy")
axes[2].set(xlabel="step", ylabel="β·(log π − log π_ref)",
            title=f"DPO's implicit rewards (β = {dpo_beta})")
for ax in axes:
    ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# A known pattern shows in the last panel: DPO raises the *gap* between chosen and rejected,
# and it does so mostly by lowering the rejected replies' log-probs, while the chosen ones'
# can go down too.
#
# ## SFT, PPO and DPO on the same held-out questions
#
# The table's rows are the SFT model, 3.3.2's PPO policy (from the cache), and the two runs
# above. Columns: mean task accuracy and hallucination rate, with every held-out record of
# 3.2 played as a chat and judged; the reward model's mean score of the first answers; the
# KL from the reference per sampled answer.

# %% tags=["trained-figures"]
start = time.perf_counter()
reward, _ = reward_model(cache_dir, recipe, device=dev, log=None)
ppo_vlm, _ = ppo_policy(cache_dir, recipe, device=dev, log=None)
seconds["reward model and PPO policy (loaded or trained)"] = time.perf_counter() - start
start = time.perf_counter()
heldout = heldout_prompts(recipe, test_scenes, processor, image_size)
table, judged = {}, {}
for name, model in (("SFT", sft), ("PPO (3.3.2)", ppo_vlm), ("DPO", dpo_vlm),
                    ("IPO", ipo_vlm)):
    table[name], judged[name] = evaluate_policy(model, sft, reward, tokenizer, heldout, seed=seed)
seconds["evaluation"] = time.perf_counter() - start
print(f"{'':>12} {'task acc.':>10} {'halluc.':>8} {'reward':>8} {'KL':>7}")
for name, row in table.items():
    print(f"{name:>12} {row['mean_task_accuracy']:>10.3f} {row['hallucination_rate']:>8.3f} "
          f"{row['reward']:>+8.3f} {row['kl']:>7.2f}")
metrics["heldout"] = table

# %% [markdown]
# ## What this run shows
#
# The verdicts below are computed from the table, against the bar: a method helps if
# it lowers the hallucination rate without losing more than 2 points of task accuracy.
# Every method answers the same held-out questions as the SFT model, so each change is
# measured answer by answer, with its standard error (se); a fall of the hallucination
# rate counts only when it exceeds two standard errors. The whiskers in the figure are
# those two standard errors: a bar whose whisker crosses zero is a change this many
# questions cannot tell from noise.

# %% tags=["nbval-ignore-output"]
versus_sft = versus_reference_model(judged, base="SFT")
for name, change in versus_sft.items():
    metrics[f"{name}_verdict"] = change["verdict"]
    print(f"{name:>12}: hallucination {change['hallucination_change']:+.3f} "
          f"± {change['hallucination_se']:.3f}, task accuracy {change['accuracy_change']:+.3f} "
          f"± {change['accuracy_se']:.3f} -> {change['verdict']}")
metrics["versus_sft"] = versus_sft
metrics["sft_hallucination_rate"] = table["SFT"]["hallucination_rate"]
metrics.update(headline_changes("dpo", versus_sft["DPO"], metrics["sft_hallucination_rate"]))
fig = plot_paired_changes(versus_sft, "SFT")
plt.show()
_ = write_metrics("3.3.3", metrics, output_dir)

# %% [markdown]
# What preference tuning can remove, and what it cannot. The SFT model's hallucinations
# are of two kinds. Some it learned from its data: the careless annotator's answers named
# things that were not there, and the model learned to do the same (3.3.1 measures this
# share, `learned_hallucination`, against 3.2's model trained on clean data). The rest are
# perception errors that 3.2's clean model makes too (3.2's probe: it cannot always tell a
# small circle from a small diamond). A preference between two of the model's own replies
# can shift probability away from invented content the model already knows is unlikely
# given the image, which is the learned kind; it cannot teach the model to see. So the fall
# above is bounded by the learned share, not by the whole rate: a relative fall like
# RLHF-V's (about a third) needs the learned share to be most of it. The pairs are sampled
# at temperature 1 and often differ in a word or two, and what DPO gains on sampled
# replies transfers only partly to greedy answers. To see the clean-data case, where almost
# every hallucination is a perception error, run 3.3.1 to 3.3.3 with
# `-p annotator_hallucination_rate 0`.

# %% tags=["nbval-ignore-output"]
print("wall times:", {name: f"{value:.0f} s" for name, value in seconds.items()})
