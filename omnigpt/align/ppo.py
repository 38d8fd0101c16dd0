"""PPO for RLHF (Ziegler et al. 2019, Stiennon et al. 2020, InstructGPT: Ouyang et al. 2022).

One step:
  1. rollout   sample one response per prompt from the policy (batched KV-cache generation);
  2. score     reward model score s at the response's last token (or the task verifier); with
               reward_norm_samples, s is normalised to (s - mu) / sigma, mu and sigma the reward model's mean and
               std over the starting policy's own responses, measured once before training (InstructGPT normalises
               its reward model so that SFT outputs score 0 on average); the value outputs are read on that scale;
  3. rewards   per token r_t = -beta * (log pi(y_t) - log pi_ref(y_t)), plus s on the last token
               (beta fixed, or adapted towards a target KL per response: Ziegler et al.'s controller);
  4. GAE       advantages A_t and returns from r_t and the value model's V_t (value model initialised from the
               reward model), advantages whitened;
  5. update    `ppo_epochs` passes over `minibatches` minibatches, minimising
                   max(-A r, -A clip(r, 1-eps, 1+eps))                              (r = pi / pi_old per token)
                 + vf_coef * 0.5 * max((V - R)^2, (clip(V, V_old +- eps_v) - R)^2)
                 + ptx_coef * (pretraining LM loss on a packed batch)                 (PPO-ptx)

Logged every step (metrics.jsonl) and every log_every steps (a line): reward-model score, total reward, KL to the
reference, beta, entropy, clip fraction, approximate KL to the rollout policy, losses, response length, and the
verified score when the prompts carry task specs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from omnigpt.align.data import Prompt, batch_indices, encode_prompt, make_batch
from omnigpt.align.config import PPOConfig
from omnigpt.align.loop import Run
from omnigpt.align.modeling import (
    add_scalar_head, entropy, load_policy, load_scalar_model, masked_mean, masked_whiten, response_logits,
    scalar_outputs, token_logprobs,
)
from omnigpt.align.rollout import RewardFn, fitting_prompts, sample_responses, verified


# ---- the math --------------------------------------------------------------------------------------------------
def kl_penalized_rewards(score_B, logp_BR, ref_logp_BR, mask_BR, beta: float):
    """Per-token rewards -beta * (log pi - log pi_ref), with the sequence score added on each row's last response
    token. Returns (rewards, per-token KL estimate), both zero on padding."""
    kl = (logp_BR - ref_logp_BR) * mask_BR
    rewards = -beta * kl
    last = (mask_BR.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(score_B), device=score_B.device), last] += score_B
    return rewards, kl


def gae(rewards_BR, values_BR, mask_BR, gamma: float, lam: float):
    """Generalised advantage estimation over each row's response (mask: 1 on a prefix of the row).
    delta_t = r_t + gamma V_{t+1} - V_t (V after the last token is 0); A_t = delta_t + gamma lam A_{t+1}."""
    values, rewards = values_BR * mask_BR, rewards_BR * mask_BR
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    R = rewards.shape[1]
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask_BR[:, t]
        advantages[:, t] = running
    return advantages, advantages + values


def ppo_losses(logp, old_logp, advantages, values, old_values, returns, mask, clip_range: float, clip_range_value: float) -> dict:
    """Clipped policy loss and clipped value loss, masked means over response tokens, with diagnostics."""
    ratio = torch.exp(logp - old_logp)
    pg = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    v_clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    vf = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
    return {"pg_loss": masked_mean(pg, mask), "vf_loss": masked_mean(vf, mask),
            "clipfrac": masked_mean(((ratio - 1).abs() > clip_range).float(), mask),
            "approx_kl": masked_mean(0.5 * (logp - old_logp) ** 2, mask)}


@dataclass
class KLController:
    """beta: fixed (target 0), or adaptive (Ziegler et al. 2019): beta *= 1 + clip(KL/target - 1, +-0.2) * n / horizon
    after each batch of n responses."""

    value: float
    target: float = 0.0
    horizon: int = 10000

    def update(self, kl: float, n: int) -> float:
        if self.target > 0:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n / self.horizon
        return self.value


@torch.no_grad()
def reward_stats(policy, reward_fn, tok, ids: list[list[int]], prompts: list[Prompt], keep: list[int], tc: PPOConfig,
                 run: Run) -> tuple[float, float]:
    """Mean and std of the reward model's score on `tc.reward_norm_samples` responses (over all ranks) of the
    starting policy to train prompts, sampled under their own seed (the run's random state is left alone)."""
    device = run.device
    n = max(1, tc.reward_norm_samples // run.info.world_size)
    g = torch.Generator().manual_seed(tc.seed * 1000 + 17 + run.info.rank)
    rows = [keep[i] for i in torch.randint(len(keep), (n,), generator=g).tolist()]
    total = {"n": 0.0, "sum": 0.0, "sumsq": 0.0}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(tc.seed * 1000 + 23 + run.info.rank)
        for k in range(0, n, tc.batch_size):
            chunk = rows[k:k + tc.batch_size]
            responses = sample_responses(policy, [ids[i] for i in chunk], tok, max_new_tokens=tc.max_new_tokens,
                                         temperature=tc.temperature, lockstep=run.info.distributed, autocast=run.autocast)
            batch = make_batch([ids[i] for i in chunk], responses, pad_id=tok.pad_id).to(device)
            with run.autocast():
                score = reward_fn(batch, responses, [prompts[i] for i in chunk]).double()
            total = {"n": total["n"] + len(chunk), "sum": total["sum"] + score.sum().item(),
                     "sumsq": total["sumsq"] + (score ** 2).sum().item()}
    total = run.reduce(total, op="sum")
    mean = total["sum"] / total["n"]
    var = max(total["sumsq"] / total["n"] - mean ** 2, 0.0)
    return mean, max(var ** 0.5, 1e-3)


# ---- models ----------------------------------------------------------------------------------------------------
class ActorCritic(nn.Module):
    """Policy and value model as one module: one optimizer, one checkpoint. Each is its own FSDP root."""

    def __init__(self, policy: nn.Module, value: nn.Module):
        super().__init__()
        self.policy, self.value = policy, value


def ptx_loader(docs, tc: PPOConfig, run: Run):
    from omnigpt.data.packing import ListSource, PackedLoader

    return PackedLoader([ListSource("ptx", docs)], tc.ptx_seq_len, tc.ptx_batch_size, seed=tc.seed,
                        rank=run.info.rank, world_size=run.info.world_size)


# ---- the loop --------------------------------------------------------------------------------------------------
def train_ppo(policy_path, tok, prompts: list[Prompt], tc: PPOConfig, *, reward_path=None, verifier: bool = False,
              value_path=None, ref_path=None, ptx_docs=None, resume: bool = False, info=None) -> dict:
    run = Run("ppo", tc, resume, info)
    policy = load_policy(policy_path)
    cfg = policy.cfg
    ref = load_policy(ref_path) if ref_path else copy.deepcopy(policy)
    reward_model = load_scalar_model(reward_path) if reward_path else None
    if value_path or reward_path:
        value = load_scalar_model(value_path or reward_path)  # InstructGPT: the value function starts as the RM
    else:
        value = add_scalar_head(copy.deepcopy(policy))
    reward_fn = RewardFn(tok, run.prepare(reward_model, trainable=False) if reward_model is not None else None, verifier)
    model = ActorCritic(run.prepare(policy), run.prepare(value))
    ref = run.prepare(ref, trainable=False)
    opt = run.optimizer(model)
    params = [p for p in model.parameters() if p.requires_grad]
    kl_ctl = KLController(tc.kl_coef, tc.target_kl, tc.kl_horizon)
    if tc.ptx_coef > 0 and not ptx_docs:
        raise ValueError("--ptx-coef needs --ptx-data (pretraining text)")
    loader = ptx_loader(ptx_docs, tc, run) if tc.ptx_coef > 0 else None
    state = run.restore(model, opt, cfg)
    if state:
        kl_ctl.value = state["kl_coef"]
        if loader is not None:
            loader.load_state_dict(state["ptx"])

    ids = [encode_prompt(tok, p.messages) for p in prompts]
    keep = fitting_prompts(ids, tc.max_new_tokens, min(tc.max_len, cfg.max_seq_len))
    norm_mean, norm_std = 0.0, 1.0  # score -> (score - mean) / std; values are read on the same scale
    if reward_model is not None and tc.reward_norm_samples > 0:
        if state and state.get("reward_norm"):
            norm_mean, norm_std = state["reward_norm"]
        else:
            norm_mean, norm_std = reward_stats(model.policy, reward_fn, tok, ids, prompts, keep, tc, run)
        run.say(f"ppo: reward model normalised by its mean {norm_mean:.3f} and std {norm_std:.3f} over "
                f"{tc.reward_norm_samples} responses of the starting policy")

    def values_of(b):
        return (scalar_outputs(model.value, b)[0] - norm_mean) / norm_std

    run.say(f"ppo: {len(keep)} prompts ({len(prompts) - len(keep)} too long), {tc.batch_size} x {run.info.world_size} "
            f"rollouts per step, beta {kl_ctl.value}{' adaptive' if tc.target_kl else ''}, ptx {tc.ptx_coef}")
    T, V, with_tasks = tc.temperature, tok.vocab_size, all(p.task for p in prompts)
    record = {}
    while run.step < tc.steps:
        lr = run.set_lr(opt)
        # 1-4: rollout, score, per-token rewards, advantages (no gradients)
        chosen = [keep[i] for i in batch_indices(len(keep), run.step, tc.batch_size, run.info.rank, run.info.world_size, tc.seed)]
        recs = [prompts[i] for i in chosen]
        responses = sample_responses(model.policy, [ids[i] for i in chosen], tok, max_new_tokens=tc.max_new_tokens,
                                     temperature=T, lockstep=run.info.distributed, autocast=run.autocast)
        batch = make_batch([ids[i] for i in chosen], responses, pad_id=tok.pad_id).to(run.device)
        mask = batch.mask
        with torch.no_grad(), run.autocast():
            old_logp = token_logprobs(response_logits(model.policy, batch, V) / T, batch.tokens) * mask
            ref_logp = token_logprobs(response_logits(ref, batch, V) / T, batch.tokens) * mask
            old_values = values_of(batch) * mask
            score = (reward_fn(batch, responses, recs).float() - norm_mean) / norm_std
        ended = torch.tensor([float(r[-1] == tok.im_end_id) for r in responses], device=run.device)
        score = score - tc.missing_eos_penalty * (1 - ended)
        rewards, kl = kl_penalized_rewards(score, old_logp, ref_logp, mask, kl_ctl.value)
        advantages, returns = gae(rewards, old_values, mask, tc.gamma, tc.lam)
        if tc.whiten_advantages:
            advantages = masked_whiten(advantages, mask)

        # 5: PPO epochs over minibatches
        sums, n_updates = {}, 0
        for _ in range(tc.ppo_epochs):
            for mb in torch.randperm(len(responses)).to(run.device).chunk(min(tc.minibatches, len(responses))):
                b = batch.select(mb)
                with run.autocast():
                    logits = response_logits(model.policy, b, V) / T
                    values = values_of(b)
                logp = token_logprobs(logits, b.tokens) * b.mask
                losses = ppo_losses(logp, old_logp[mb], advantages[mb], values * b.mask, old_values[mb], returns[mb],
                                    b.mask, tc.clip_range, tc.clip_range_value)
                loss = losses["pg_loss"] + tc.vf_coef * losses["vf_loss"]
                if loader is not None:
                    ptx = next(loader).to(run.device)
                    with run.autocast():
                        losses["ptx_loss"] = model.policy(ptx.inputs, ptx.targets, doc_ids_BT=ptx.doc_ids, pos_BT=ptx.pos).lm_loss
                    loss = loss + tc.ptx_coef * losses["ptx_loss"]
                losses["entropy"] = masked_mean(entropy(logits.detach()), b.mask)
                losses["grad_norm"] = run.update(loss, opt, params)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + (v.item() if torch.is_tensor(v) else v)
                n_updates += 1
        run.step += 1
        stats = {"score": score.mean().item(), "reward": (score - kl_ctl.value * kl.sum(1)).mean().item(),
                 "kl": kl.sum(1).mean().item(), "response_len": mask.sum(1).mean().item(), "eos_rate": ended.mean().item(),
                 **{k: v / n_updates for k, v in sums.items()}}
        if with_tasks:  # every rank must report the same keys
            stats["verified"] = sum(verified(tok, responses, recs)) / len(recs)
        record = run.reduce(stats)
        record.update(kl_coef=kl_ctl.value, lr=lr)
        kl_ctl.update(record["kl"], tc.batch_size * run.info.world_size)
        run.log(record)
        run.maybe_checkpoint(model, opt, cfg, {"kl_coef": kl_ctl.value, "ptx": loader.state_dict() if loader else None,
                                               "reward_norm": [norm_mean, norm_std]})
    run.export(model.policy, cfg, tok, {"stage": "ppo"})
    run.export(model.value, model.value.cfg, tok, {"stage": "ppo-value", "head": "scalar", "reward_norm": [norm_mean, norm_std]},
               name="value")
    return record
