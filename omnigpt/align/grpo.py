"""GRPO (Group Relative Policy Optimization, DeepSeekMath: Shao et al. 2024): PPO without a value model.

Each prompt gets a group of G sampled responses; a response's advantage is its reward standardised within its group,
A_i = (r_i - mean(r)) / (std(r) + eps), the same for all its tokens. The loss per token is the clipped surrogate plus
a KL penalty to the reference with the unbiased, always-positive estimator
k3 = pi_ref/pi - log(pi_ref/pi) - 1, averaged over each response's tokens, then over responses:

    loss = mean_i  mean_t  -[ min(r A_i, clip(r, 1-eps, 1+eps) A_i) - beta * k3 ]        (r = pi / pi_old)

Same prompt files and rewards as PPO: a reward model, or the task verifier (rewards 1/0).
"""

from __future__ import annotations

import copy
import torch

from omnigpt.align.data import Prompt, batch_indices, encode_prompt, make_batch
from omnigpt.align.config import GRPOConfig
from omnigpt.align.loop import Run
from omnigpt.align.modeling import entropy, load_policy, load_scalar_model, masked_mean, response_logits, token_logprobs
from omnigpt.align.rollout import RewardFn, fitting_prompts, sample_responses, verified


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(N,) rewards, consecutive groups of group_size -> (N,) advantages standardised within each group."""
    r = rewards.view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).flatten()


def grpo_loss(logp, old_logp, ref_logp, advantages_B, mask, clip_range: float, beta: float) -> dict:
    ratio = torch.exp(logp - old_logp)
    A = advantages_B.unsqueeze(1)
    surrogate = torch.min(ratio * A, ratio.clamp(1 - clip_range, 1 + clip_range) * A)
    d = ref_logp - logp
    k3 = torch.exp(d) - d - 1
    per_token = -(surrogate - beta * k3)
    return {"loss": masked_mean(per_token, mask, dim=1).mean(), "k3": masked_mean(k3, mask),
            "clipfrac": masked_mean(((ratio - 1).abs() > clip_range).float(), mask)}


def train_grpo(policy_path, tok, prompts: list[Prompt], tc: GRPOConfig, *, reward_path=None, verifier: bool = False,
               ref_path=None, resume: bool = False, info=None) -> dict:
    run = Run("grpo", tc, resume, info)
    policy = load_policy(policy_path)
    cfg = policy.cfg
    ref = load_policy(ref_path) if ref_path else copy.deepcopy(policy)
    reward_model = run.prepare(load_scalar_model(reward_path), trainable=False) if reward_path else None
    reward_fn = RewardFn(tok, reward_model, verifier)
    policy, ref = run.prepare(policy), run.prepare(ref, trainable=False)
    opt = run.optimizer(policy)
    params = [p for p in policy.parameters() if p.requires_grad]
    run.restore(policy, opt, cfg)

    ids = [encode_prompt(tok, p.messages) for p in prompts]
    keep = fitting_prompts(ids, tc.max_new_tokens, min(tc.max_len, cfg.max_seq_len))
    run.say(f"grpo: {len(keep)} prompts, {tc.batch_size} x {tc.group_size} responses per rank per step, "
            f"reward {'verifier' if verifier else 'model'}; {run.info.world_size} rank(s)")
    G, T, V, with_tasks = tc.group_size, tc.temperature, tok.vocab_size, all(p.task for p in prompts)
    record = {}
    while run.step < tc.steps:
        lr = run.set_lr(opt)
        chosen = [keep[i] for i in batch_indices(len(keep), run.step, tc.batch_size, run.info.rank, run.info.world_size, tc.seed)]
        rows = [i for i in chosen for _ in range(G)]
        recs = [prompts[i] for i in rows]
        responses = sample_responses(policy, [ids[i] for i in rows], tok, max_new_tokens=tc.max_new_tokens,
                                     temperature=T, lockstep=run.info.distributed, autocast=run.autocast)
        batch = make_batch([ids[i] for i in rows], responses, pad_id=tok.pad_id).to(run.device)
        with torch.no_grad(), run.autocast():
            old_logp = token_logprobs(response_logits(policy, batch, V) / T, batch.tokens) * batch.mask
            ref_logp = token_logprobs(response_logits(ref, batch, V) / T, batch.tokens) * batch.mask
            rewards = reward_fn(batch, responses, recs).float()
        advantages = group_advantages(rewards, G)
        sums, n_updates = {}, 0
        for _ in range(tc.epochs):
            # minibatches of whole groups keep each group's advantages together
            groups = torch.randperm(len(chosen)).chunk(min(tc.minibatches, len(chosen)))
            for g in groups:
                mb = (g.unsqueeze(1) * G + torch.arange(G)).flatten().to(run.device)
                b = batch.select(mb)
                with run.autocast():
                    logits = response_logits(policy, b, V) / T
                logp = token_logprobs(logits, b.tokens) * b.mask
                out = grpo_loss(logp, old_logp[mb], ref_logp[mb], advantages[mb], b.mask, tc.clip_range, tc.kl_coef)
                out["entropy"] = masked_mean(entropy(logits.detach()), b.mask)
                out["grad_norm"] = run.update(out["loss"], opt, params)
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + (v.item() if torch.is_tensor(v) else v)
                n_updates += 1
        run.step += 1
        r = rewards.view(-1, G)
        stats = {"reward": rewards.mean().item(), "reward_std_in_group": r.std(1).mean().item(),
                 "flat_groups": (r.std(1) == 0).float().mean().item(),
                 "kl": ((old_logp - ref_logp) * batch.mask).sum(1).mean().item(),
                 "response_len": batch.mask.sum(1).mean().item(),
                 "eos_rate": sum(float(x[-1] == tok.im_end_id) for x in responses) / len(responses),
                 **{k: v / n_updates for k, v in sums.items()}}
        if with_tasks:
            stats["verified"] = sum(verified(tok, responses, recs)) / len(recs)
        record = run.reduce(stats)
        record["lr"] = lr
        run.log(record)
        run.maybe_checkpoint(policy, opt, cfg)
    run.export(policy, cfg, tok, {"stage": "grpo"})
    return record
