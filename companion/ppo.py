"""PPO with a KL penalty (section 3.3, step 3 of RLHF), on the chapter's VLM.

One PPO iteration:

1. **Rollout.** The policy answers a batch of prompts by sampling. Prompts are left-padded,
   so every reply starts at the same column and the reply tokens form one (B, R) block.
2. **Scoring.** The reward model scores each (prompt, reply); the frozen reference (the
   instruction-tuned model) gives each reply token its log-prob, and the per-token reward is
   ``-beta * kl_t`` with the reward model's score added on the reply's last token.
3. **Advantages.** The value head's estimates and GAE turn rewards into advantages
   (whitened) and returns.
4. **Updates.** A few epochs of minibatch steps on the clipped policy loss plus the clipped
   value loss; an adaptive controller moves ``beta`` towards a target KL.

The tensor maths (GAE, clipped losses, KL estimators, controllers) is in
:mod:`companion.losses.ppo`; this module feeds it from the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from companion.answers import decode_reply, generate_tokens
from companion.dpo import position_ids_for
from companion.losses.ppo import (AdaptiveKLController, FixedKLController, RunningMoments, gae,
                                  ppo_policy_loss, ppo_value_loss, reward_with_kl, whiten)
from companion.preference import prompt_turns
from companion.tokenizer import image_token_id


class PolicyWithValueHead(nn.Module):
    """A VLM policy and a value head on its last hidden state (one trunk, two heads)."""

    def __init__(self, vlm):
        super().__init__()
        self.vlm = vlm
        self.config = vlm.config
        self.value_head = nn.Linear(vlm.config.text_config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, pixel_values):
        """``(logits (B, T, V), values (B, T))``; positions skip left padding."""
        hidden = self.vlm.model(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids_for(attention_mask),
                                pixel_values=pixel_values).last_hidden_state
        return self.vlm.lm_head(hidden), self.value_head(hidden).squeeze(-1).float()


@dataclass
class Rollout:
    """Sampled replies of one batch of prompts, laid out for scoring and training."""

    input_ids: torch.Tensor       # (B, P + R): left-padded prompt, reply, right padding
    attention_mask: torch.Tensor  # (B, P + R)
    pixel_values: torch.Tensor    # (B, 3, H, W)
    reply_mask: torch.Tensor      # (B, R) True on reply tokens
    prompt_length: int            # P: the reply block starts at this column
    texts: list[str]
    prompt_rows: list[int]        # which prompt each row answers
    suppressed: list[int]         # token ids generation never samples (the image placeholder)


def _reply_logps(logits: torch.Tensor, ids: torch.Tensor, p: int, suppressed) -> torch.Tensor:
    """Log-probs of reply tokens ``ids[:, p:]`` from ``logits`` under the distribution they
    were sampled from (suppressed ids removed, as ``generate`` removes them)."""
    logits = logits[:, p - 1:-1].float()
    if suppressed:
        logits = logits.index_fill(-1, torch.tensor(suppressed, device=logits.device),
                                   float("-inf"))
    return torch.log_softmax(logits, -1).gather(-1, ids[:, p:, None]).squeeze(-1)


def rollout(policy: PolicyWithValueHead, tokenizer, prompts: Sequence[str],
            pixel_values: torch.Tensor, rows: Sequence[int], max_new_tokens: int = 32,
            temperature: float = 1.0, seed: int = 0) -> Rollout:
    """Let ``policy`` sample a reply to each prompt in ``rows``."""
    rows = list(rows)
    prompt_list, replies = generate_tokens(
        policy.vlm, tokenizer, [prompt_turns(prompts[r]) for r in rows], pixel_values[rows],
        max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
        generator_seed=seed)
    width_p = max(len(p) for p in prompt_list)
    width_r = max(1, max(len(r) for r in replies))
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width_p + width_r), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    reply_mask = torch.zeros(len(rows), width_r, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_list, replies)):
        ids[i, width_p - len(p):width_p] = torch.tensor(p)
        mask[i, width_p - len(p):width_p + len(r)] = 1
        if r:
            ids[i, width_p:width_p + len(r)] = torch.tensor(r)
            reply_mask[i, :len(r)] = True
    texts = [decode_reply(tokenizer, r) for r in replies]
    return Rollout(ids, mask, pixel_values[rows], reply_mask, width_p, texts, rows,
                   [image_token_id(tokenizer)])


def reply_logps_values(policy: PolicyWithValueHead, batch: Rollout, rows=None):
    """Log-probs of the reply tokens under ``policy`` and its values for the states that
    chose them, both (B, R): position P-1+j predicts reply token j."""
    device = next(policy.parameters()).device
    index = slice(None) if rows is None else rows
    ids = batch.input_ids[index].to(device)
    logits, values = policy(ids, batch.attention_mask[index].to(device),
                            batch.pixel_values[index].to(device))
    p = batch.prompt_length
    return _reply_logps(logits, ids, p, batch.suppressed), values[:, p - 1:-1]


@torch.no_grad()
def reference_reply_logps(reference, batch: Rollout) -> torch.Tensor:
    """Log-probs of the reply tokens under a plain VLM (the frozen reference): (B, R)."""
    device = next(reference.parameters()).device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    logits = reference(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask),
                       pixel_values=batch.pixel_values.to(device)).logits
    return _reply_logps(logits, ids, batch.prompt_length, batch.suppressed)


@dataclass(frozen=True)
class PPOConfig:
    iterations: int = 40          # rollout + update rounds
    batch_size: int = 32          # prompts per rollout
    minibatches: int = 2          # per PPO epoch
    ppo_epochs: int = 2           # passes over each rollout (TRL: 4)
    lr: float = 1e-4
    init_kl_coef: float = 0.1     # beta; 0 turns the KL penalty off
    adaptive_kl: bool = True
    target_kl: float = 1.0        # per-reply KL (nats) the controller aims at
    horizon: int = 10_000
    kl_kind: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    max_new_tokens: int = 32
    temperature: float = 1.0
    grad_clip: float = 1.0
    score_norm: bool = False      # scores to unit scale by their running moments (TRL's
                                  # use_score_norm): for reward models whose scale is large
    seed: int = 0

    def __post_init__(self):
        if self.iterations < 1 or self.batch_size < 1 or self.ppo_epochs < 1:
            raise ValueError("iterations, batch_size and ppo_epochs must be at least 1")
        if not 1 <= self.minibatches <= self.batch_size:
            raise ValueError(f"minibatches={self.minibatches} must be in [1, batch_size]")
        if self.init_kl_coef < 0:
            raise ValueError(f"init_kl_coef={self.init_kl_coef} must be >= 0")


@dataclass
class PPOHistory:
    steps: list[dict] = field(default_factory=list)

    def series(self, key: str):
        return [s["iteration"] for s in self.steps], [s[key] for s in self.steps]


def train_ppo(policy: PolicyWithValueHead, reference, tokenizer, prompts: Sequence[str],
              pixel_values: torch.Tensor, reward_fn: Callable[[list[int], list[str]], torch.Tensor],
              config: PPOConfig, gold_fn: Callable[[list[int], list[str]], dict] | None = None,
              log: Callable[[str], None] | None = print) -> PPOHistory:
    """Optimise ``policy`` with PPO. ``reward_fn(prompt_rows, texts)`` scores replies (the
    reward model); ``gold_fn`` (optional) adds logged-only metrics such as the judge's
    verdicts, which the policy never sees. Logs reward, KL, length and losses every iteration."""
    params = [p for p in policy.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the policy has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0, foreach=True)
    controller = (AdaptiveKLController(config.init_kl_coef, config.target_kl, config.horizon)
                  if config.adaptive_kl and config.init_kl_coef > 0
                  else FixedKLController(config.init_kl_coef))
    generator = torch.Generator().manual_seed(config.seed)
    moments = RunningMoments() if config.score_norm else None
    history = PPOHistory()
    reference.eval()
    for iteration in range(config.iterations):
        start = time.perf_counter()
        rows = torch.randint(len(prompts), (config.batch_size,), generator=generator).tolist()
        policy.eval()
        batch = rollout(policy, tokenizer, prompts, pixel_values, rows, config.max_new_tokens,
                        config.temperature, seed=config.seed * 100_003 + iteration)
        mask = batch.reply_mask
        with torch.no_grad():
            old_logps, old_values = reply_logps_values(policy, batch)
            old_logps, old_values = old_logps.cpu(), old_values.cpu()
            ref_logps = reference_reply_logps(reference, batch).cpu()
            scores = reward_fn(rows, batch.texts).float().cpu()
            used = scores
            if moments is not None:
                moments.update(scores)
                used = moments.normalise(scores)
            beta = controller.value
            rewards, kl = reward_with_kl(used, old_logps, ref_logps, mask, beta,
                                         kind=config.kl_kind)
            advantages, returns = gae(rewards, old_values, config.gamma, config.lam, mask)
            advantages = whiten(advantages, mask)
        sequence_kl = (kl * mask).sum(1)
        controller.update(float(sequence_kl.mean()), config.batch_size)
        policy.train()
        stats = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0}
        n_updates = 0
        for _ in range(config.ppo_epochs):
            order = torch.randperm(config.batch_size, generator=generator)
            for chunk in order.chunk(config.minibatches):
                if not bool(mask[chunk].any()):
                    continue
                logps, values = reply_logps_values(policy, batch, chunk)
                device = logps.device
                m = mask[chunk].to(device)
                policy_loss, p_stats = ppo_policy_loss(logps, old_logps[chunk].to(device),
                                                       advantages[chunk].to(device), m,
                                                       config.clip_range)
                value_loss, _ = ppo_value_loss(values, old_values[chunk].to(device),
                                               returns[chunk].to(device), m,
                                               config.clip_range_value)
                loss = policy_loss + config.vf_coef * value_loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"PPO loss is {loss.item()} at iteration "
                                             f"{iteration}; lower lr or check the rewards")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                stats["policy_loss"] += float(policy_loss.detach())
                stats["value_loss"] += float(value_loss.detach())
                stats["clip_fraction"] += p_stats["clip_fraction"]
                stats["approx_kl"] += p_stats["approx_kl"]
                n_updates += 1
        record = {"iteration": iteration + 1, "reward": float(scores.mean()),
                  "kl": float(sequence_kl.mean()), "beta": beta,
                  "length": float(mask.sum(1).float().mean()),
                  **{k: v / max(1, n_updates) for k, v in stats.items()},
                  "seconds": time.perf_counter() - start}
        if gold_fn is not None:
            record.update(gold_fn(rows, batch.texts))
        history.steps.append(record)
        if log and (iteration + 1) % max(1, config.iterations // 5) == 0:
            log(f"iteration {iteration + 1:>4}/{config.iterations}  reward {record['reward']:+.3f}"
                f"  kl {record['kl']:.3f}  beta {beta:.3f}  length {record['length']:.1f}")
    policy.eval()
    return history


@torch.no_grad()
def sampled_kl(policy_vlm, reference, tokenizer, prompts: Sequence[str],
               pixel_values: torch.Tensor, max_new_tokens: int = 32, samples: int = 2,
               seed: int = 0, batch_size: int = 64) -> float:
    """Monte-Carlo KL(policy || reference) per reply, in nats: the mean over sampled replies
    of sum_t (log pi - log ref) (the k1 estimator, unbiased for the sequence KL)."""
    wrapper = PolicyWithValueHead(policy_vlm)
    total, count = 0.0, 0
    for k in range(samples):
        for start in range(0, len(prompts), batch_size):
            rows = list(range(start, min(start + batch_size, len(prompts))))
            batch = rollout(wrapper, tokenizer, prompts, pixel_values, rows, max_new_tokens,
                            seed=seed * 1000 + k * 100 + start)
            logps, _ = reply_logps_values(wrapper, batch)
            ref = reference_reply_logps(reference, batch)
            mask = batch.reply_mask.to(logps.device)
            total += float(((logps - ref) * mask).sum())
            count += len(rows)
    return total / max(1, count)
