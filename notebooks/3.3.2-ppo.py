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
# # 3.3.2 RLHF, step 3: PPO with a KL penalty (PPO强化学习优化)
#
# The seed's third step: use the reward model's score as the reward signal and optimise the
# policy (the SFT model of 3.3.1: 3.2's recipe trained on machine-written data) to produce
# answers that score higher, while a KL penalty keeps it close to where it started:
#
# maximise  E[r(answer)] − β · KL(π ‖ π_ref).
#
# PPO does this with the machinery below, all in `companion.losses.ppo` (tested against
# hand-computed references) and driven by `companion.ppo`:
#
# - **Rollouts**: the policy samples answers to a batch of questions.
# - **Per-token rewards**: each answer token gets −β·(log π − log π_ref) (the KL penalty,
#   estimated per token); the reward model's score is added on the answer's last token.
# - **Value head and GAE**: a linear head on the policy's hidden state predicts the return
#   from each token; generalised advantage estimation (γ = 1, λ = 0.95) turns rewards and
#   values into advantages, which are whitened.
# - **Clipped updates**: a few epochs of minibatch steps on the clipped surrogate
#   max(−Aρ, −A·clip(ρ, 1 ± ε)) and the clipped value loss, so no update moves the policy far
#   from the one that sampled the answers.
# - **An adaptive KL controller** raises β when the KL overshoots its target and lowers it
#   when the KL falls short.
# - **Score normalisation**: the reward model of 3.3.1 scores a reply by its log-likelihood
#   given the scene's facts, a number with no bound below. Each score is whitened by the
#   running mean and standard deviation of all scores so far (TRL's `use_score_norm`), so
#   one very unlikely reply cannot dominate an update.

# %% tags=["parameters"]
seed = 0  # random seed for rollouts, minibatches and initialisation
device = "auto"  # "auto" picks cuda, then mps, then cpu; or name one
threads = 2  # CPU threads for torch (fixed so the printed numbers are reproducible)
output_dir = "../build/interactive"  # the runner sets it; metrics go to
#   output_dir/metrics/3.3.2.json
cache_dir = "../.cache"  # shared artifacts (3.2's model, 3.3.1's reward model, this PPO policy)
upstream = "default"  # the book.toml profile whose 3.2 and 3.3.1 parameters made the models this
#   notebook starts from (the runner passes the profile it runs)
upstream_changes = {}  # upstream parameters changed from that profile, e.g. {"rm_steps": 400}
#   (the runner passes its -p options here)
ppo_iterations = 60  # PPO rounds (rollout, then updates)
ppo_batch_size = 64  # questions per rollout
ppo_lr = 5e-5  # PPO learning rate (policy, value head)
ppo_kl_coef = 0.1  # initial β of the KL penalty (adaptive, target 1 nat per answer)
ppo_score_norm = True  # reward-model scores whitened by their running mean and std (a
#   log-likelihood reward is unbounded)
test_scenes = 60  # 3.2's held-out scenes, for the final evaluation
sft_checkpoint = ""  # a LLaVA checkpoint (hub id or folder) as the starting policy and reference
#   instead of 3.2's model
preference_json = ""  # a preference JSON (TRL fields prompt/chosen/rejected/images) to train the
#   reward model on instead of 3.3.1's pairs
image_folder = ""  # where preference_json's image paths are resolved (default: its folder)

# %% [markdown]
# ## Setup: the policy, the reference, the reward model

# %%
import time

import matplotlib.pyplot as plt
import torch

from companion.book import write_metrics
from companion.losses.ppo import gae, reward_with_kl, whiten
from companion.ppo import (PolicyWithValueHead, reference_reply_logps, reply_logps_values,
                           rollout)
from companion.plots import moving_average, plot_paired_changes
from companion.preference import score_replies
from companion.rlhf import (evaluate_policy, headline_changes, heldout_prompts, ppo_policy,
                            notebook_recipe, reward_model, rlhf_prompts, run_ppo,
                            scene_facts, sft_model, versus_reference_model)
from companion.runtime import setup

%matplotlib inline
dev = setup(seed=seed, device=device, threads=threads)
metrics = {}
seconds = {}
recipe = notebook_recipe("3.3.2", globals())  # this notebook's and upstream parameters
start = time.perf_counter()
sft, processor, tokenizer = sft_model(cache_dir, recipe, device=dev, log=None)
reward, _ = reward_model(cache_dir, recipe, device=dev, log=None)
seconds["3.2 model and reward model (loaded or trained)"] = time.perf_counter() - start
image_size = sft.config.vision_config.image_size
by_id, prompts, pixels, train_rows, _ = rlhf_prompts(recipe, processor, image_size)
texts = [p["prompt"] for p in prompts]

# %% [markdown]
# ## One rollout, token by token
#
# Before training, the policy equals the reference, so the KL penalty is zero everywhere
# and the only reward is the reward model's score on the last token. GAE spreads it back over
# the answer through the value head (still untrained here: all values are 0, so with γ = 1
# each token's advantage is the discounted sum of what follows).

# %% tags=["nbval-ignore-output"]
policy = PolicyWithValueHead(sft)
batch = rollout(policy, tokenizer, texts, pixels, train_rows[:8], recipe.max_new_tokens,
                seed=seed)
with torch.no_grad():
    logps, values = reply_logps_values(policy, batch)
    ref_logps = reference_reply_logps(sft, batch)
facts = (scene_facts(by_id, [prompts[r]["scene_id"] for r in batch.prompt_rows])
         if reward.reads_facts else None)  # a factual reward model reads the scene in words
scores = score_replies(reward, tokenizer, [texts[r] for r in batch.prompt_rows], batch.texts,
                       batch.pixel_values, facts=facts)
rewards, kl = reward_with_kl(scores, logps, ref_logps, batch.reply_mask, beta=ppo_kl_coef)
advantages, returns = gae(rewards, values, gamma=1.0, lam=0.95, mask=batch.reply_mask)
row = 0
n = int(batch.reply_mask[row].sum())
tokens = [tokenizer.decode([t]) for t in batch.input_ids[row, batch.prompt_length:][:n]]
print(f"question: {texts[batch.prompt_rows[row]].replace(chr(10), ' ')}\nanswer:   "
      f"{batch.texts[row]}\nreward model score {float(scores[row]):+.3f}; "
      f"KL per token (policy = reference): max |kl| {float(kl.abs().max()):.1e}")

# %% [markdown]
# Its per-token rewards and advantages: the reward model's score sits on the last token,
# and GAE carries it back over the whole answer.

# %% tags=["nbval-ignore-output"]
fig, ax = plt.subplots(figsize=(11, 3))
ax.bar(range(n), rewards[row, :n], label="per-token reward")
ax.plot(range(n), advantages[row, :n], "o-", color="C1", label="GAE advantage (λ = 0.95)")
ax.plot(range(n), whiten(advantages, batch.reply_mask)[row, :n], "s--", color="C2",
        label="whitened (over the batch)")
ax.set_xticks(range(n), tokens, rotation=60, fontsize=7)
ax.set(xlabel="answer token", ylabel="value", title="Rewards and advantages of one sampled answer")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# GAE written out for those eight answers, one row at a time from the last token back:
# δ_t = r_t + γ·V_{t+1} − V_t (the value after the answer's last token is 0), then
# A_t = δ_t + γλ·A_{t+1}, and the value head's target, the return, is A_t + V_t. It must
# equal the package's `gae`, padding included (0 there):

# %% tags=["nbval-ignore-output"]
gamma, lam = 1.0, 0.95
adv_by_hand = torch.zeros_like(rewards)
for r in range(rewards.shape[0]):
    next_value, next_advantage = 0.0, 0.0
    for t in reversed(range(int(batch.reply_mask[r].sum()))):
        delta = rewards[r, t] + gamma * next_value - values[r, t]
        adv_by_hand[r, t] = next_advantage = delta + gamma * lam * next_advantage
        next_value = values[r, t]
returns_by_hand = (adv_by_hand + values) * batch.reply_mask
assert torch.allclose(adv_by_hand, advantages, atol=1e-5)
assert torch.allclose(returns_by_hand, returns, atol=1e-5)
largest = float((adv_by_hand - advantages).abs().max())
print(f"GAE written out = gae(): largest difference {largest:.1e} "
      f"over {int(batch.reply_mask.sum())} tokens")

# %% [markdown]
# ## PPO against the reward model
#
# Every iteration samples answers to 64 training questions, scores them, and takes two
# epochs of two minibatch steps. The judge also scores every rollout, but only for *us*:
# the policy only ever sees the reward model. The trained policy is cached for 3.3.3.

# %% tags=["trained-figures"]
start = time.perf_counter()
ppo_vlm, history = ppo_policy(cache_dir, recipe, device=dev, log=None)
seconds["PPO (trained or loaded)"] = time.perf_counter() - start
first, last = history[:10], history[-10:]


def mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


for key in ("reward", "kl", "length", "utility", "hallucinated"):
    print(f"{key:>13}: first 10 iterations {mean(first, key):+.3f}, last 10 {mean(last, key):+.3f}")

# %% [markdown]
# ## Without the KL penalty (β = 0)
#
# The KL term is what keeps the policy from chasing the reward model into regions where the
# reward model is wrong. With β = 0 nothing holds it back. Same run, β = 0:

# %% tags=["trained-figures"]
start = time.perf_counter()
free_vlm, free_history = run_ppo(recipe, sft, reward, tokenizer, processor, kl_coef=0.0,
                                 device=dev)
free_history = free_history.steps
seconds["PPO with beta = 0"] = time.perf_counter() - start
for key in ("reward", "kl", "length", "utility", "hallucinated"):
    print(f"{key:>13}: first 10 iterations {mean(free_history[:10], key):+.3f}, "
          f"last 10 {mean(free_history[-10:], key):+.3f}")

# %%
panels = [("reward", "reward model score"), ("kl", "KL(π ‖ π_ref) per answer (nats)"),
          ("utility", "judge's utility (never optimised)"),
          ("hallucinated", "share of hallucinating answers"), ("length", "answer length (tokens)"),
          ("beta", "β")]
fig, axes = plt.subplots(2, 3, figsize=(14, 6))
window = max(1, ppo_iterations // 10)
for ax, (key, label) in zip(axes.flat, panels):
    for name, rows in ((f"β adaptive from {ppo_kl_coef}", history), ("β = 0", free_history)):
        ax.plot(*moving_average([r[key] for r in rows], window), label=name)
    ax.set(xlabel="PPO iteration", ylabel=label, title=label)
axes[0, 0].legend(fontsize=8)
fig.suptitle(f"PPO on the rollouts (moving average of {window} iterations)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Held-out evaluation
#
# Greedy answers on 3.2's held-out scenes, every record played as a chat and judged, as in
# 3.2; the reward model's mean score of the first answers; and the KL from the reference per
# sampled answer.

# %% tags=["trained-figures"]
start = time.perf_counter()
heldout = heldout_prompts(recipe, test_scenes, processor, image_size)
rows, judged = {}, {}
for name, model in (("SFT", sft), ("PPO", ppo_vlm), ("PPO, β = 0", free_vlm)):
    rows[name], judged[name] = evaluate_policy(model, sft, reward, tokenizer, heldout, seed=seed)
seconds["evaluation"] = time.perf_counter() - start
print(f"{'':>12} {'task acc.':>10} {'halluc.':>8} {'reward':>8} {'KL':>7}")
for name, row in rows.items():
    print(f"{name:>12} {row['mean_task_accuracy']:>10.3f} {row['hallucination_rate']:>8.3f} "
          f"{row['reward']:>+8.3f} {row['kl']:>7.2f}")
metrics["heldout"] = rows
metrics["ppo_last10"] = {k: mean(last, k) for k in ("reward", "kl", "utility", "hallucinated")}
metrics["ppo_beta0_last10"] = {k: mean(free_history[-10:], k)
                               for k in ("reward", "kl", "utility", "hallucinated")}

# %% [markdown]
# ## What this run shows
#
# Read the table against 3.3.1: PPO's reward model is the factual one, which ranks held-out
# pairs well above chance but far from perfectly. PPO does what it is built to do: it raises
# that model's score on the held-out answers (the reward column). Whether that helps
# depends entirely on how well the reward model tracks the judge, and the judge's columns
# (task accuracy, hallucination rate) answer that; the KL column says how far the policy
# had to move for it.
#
# The β = 0 row is the textbook experiment. With nothing holding it near the reference, the
# policy drifts further from it (compare the KL columns). The textbook failure is *reward
# hacking*: the policy finds what the reward model gets wrong and collects a higher score
# while the judge rates its answers lower. Whether a run shows it depends on how
# exploitable the reward model is and how far the policy can travel: here the scores are
# whitened, so no single reply's score can dominate an update, and the run is 60
# iterations long. Try `ppo_score_norm=False`: a log-likelihood reward with no bound below
# then has nothing to stop it.
#
# The lines below compute these comparisons from this run's table. Both policies answer
# the same held-out questions as the SFT model, so each change is measured answer by answer
# (a paired difference), with its standard error. A method *helped* when the hallucination
# rate fell by more than two standard errors while mean task accuracy lost at most 2
# points; a smaller fall is noise as far as this many questions can tell.

# %% tags=["nbval-ignore-output"]
sft_row = rows["SFT"]
versus_sft = versus_reference_model(judged, base="SFT")
for name, change in versus_sft.items():
    row = rows[name]
    metrics[f"{name}_verdict"] = change["verdict"]
    print(f"{name:>11}: reward-model score {row['reward'] - sft_row['reward']:+.3f}, "
          f"KL {row['kl']:.2f} nats\n{'':>13}hallucination {change['hallucination_change']:+.3f} "
          f"± {change['hallucination_se']:.3f}, task accuracy {change['accuracy_change']:+.3f} "
          f"± {change['accuracy_se']:.3f} -> {change['verdict']}")
metrics["versus_sft"] = versus_sft
metrics.update(headline_changes("ppo", versus_sft["PPO"], sft_row["hallucination_rate"]))
metrics["ppo_kl"], metrics["ppo_beta0_kl"] = rows["PPO"]["kl"], rows["PPO, β = 0"]["kl"]
fig = plot_paired_changes(versus_sft, "SFT")
plt.show()
_ = write_metrics("3.3.2", metrics, output_dir)

# %% tags=["nbval-ignore-output"]
print("wall times:", {name: f"{value:.0f} s" for name, value in seconds.items()})
