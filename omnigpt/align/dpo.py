"""Direct Preference Optimization (Rafailov et al. 2023): the reward model's Bradley-Terry loss with the policy's
implicit reward  s(x, y) = beta * [log pi(y|x) - log pi_ref(y|x)]  (sums over the answer's assistant tokens), so

    loss = - log sigmoid( beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))] )

on the same comparison files (K-way rankings expand to all pairs in one element, as for the reward model).
The reference is the frozen starting policy.
"""

from __future__ import annotations

import copy
import torch

from omnigpt.align.data import EncodedComparison, batch_indices, comparison_batch
from omnigpt.align.config import DPOConfig
from omnigpt.align.loop import Run
from omnigpt.align.modeling import load_policy, sequence_logprobs
from omnigpt.align.reward import Pairs, pairwise_eval, preference_loss, ranking_pairs


def dpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, pairs: Pairs, beta: float):
    """(loss, per-pair correctness, per-pair implicit reward margin). logps: (N,) per answer."""
    scores = beta * (policy_logps - ref_logps)
    loss, correct, _ = preference_loss(scores, pairs)
    return loss, correct, scores[pairs.better] - scores[pairs.worse]


def train_dpo(model_path, tok, train: list[EncodedComparison], val: list[EncodedComparison] | None, tc: DPOConfig,
              resume: bool = False, info=None, ref_path=None) -> dict:
    run = Run("dpo", tc, resume, info)
    policy = load_policy(model_path)
    ref = load_policy(ref_path) if ref_path else copy.deepcopy(policy)
    cfg = policy.cfg
    policy, ref = run.prepare(policy), run.prepare(ref, trainable=False)
    opt = run.optimizer(policy)
    params = [p for p in policy.parameters() if p.requires_grad]
    run.restore(policy, opt, cfg)
    V = tok.vocab_size

    def implicit_reward(batch):
        with torch.no_grad():
            ref_lp = sequence_logprobs(ref, batch, V)
        return tc.beta * (sequence_logprobs(policy, batch, V) - ref_lp)

    run.say(f"dpo: {len(train)} comparisons, beta {tc.beta}; {run.info.world_size} rank(s)")
    record = {}
    while run.step < tc.steps:
        lr = run.set_lr(opt)
        idx = batch_indices(len(train), run.step, tc.batch_size, run.info.rank, run.info.world_size, tc.seed)
        batch, sizes, p = comparison_batch([train[i] for i in idx], tok.pad_id)
        batch = batch.to(run.device)
        pairs = ranking_pairs(sizes, p, run.device)
        with run.autocast():
            with torch.no_grad():
                ref_logps = sequence_logprobs(ref, batch, V)
            logps = sequence_logprobs(policy, batch, V)
        loss, correct, margin = dpo_loss(logps, ref_logps, pairs, tc.beta)
        gnorm = run.update(loss, opt, params)
        run.step += 1
        first = torch.tensor([0] + sizes[:-1], device=run.device).cumsum(0)  # each element's best answer
        record = run.reduce({"loss": loss.item(), "accuracy": correct.mean().item(), "margin": margin.mean().item(),
                             "logp_best": logps[first].mean().item(), "logratio_best": (logps - ref_logps)[first].mean().item()})
        record.update(lr=lr, grad_norm=gnorm)
        if val and run.due(tc.eval_every):
            record.update(pairwise_eval(implicit_reward, val, run, tok.pad_id))
        run.log(record)
        run.maybe_checkpoint(policy, opt, cfg)
    run.export(policy, cfg, tok, {"stage": "dpo", "beta": tc.beta})
    return record
