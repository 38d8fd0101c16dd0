"""Reward model: the LM with a scalar head, trained on comparisons with the Bradley-Terry loss.

A comparison with K ranked answers is one batch element: its K answers go through the model once and all
C(K, 2) pairs (better, worse) enter the loss with weight 1 / C(K, 2) (InstructGPT: pairs of one prompt are
correlated, so they share one element's weight rather than being shuffled as separate examples). With scores s:

    loss = - mean over elements of  sum over its pairs  w * [ p log sigmoid(s_better - s_worse)
                                                            + (1 - p) log sigmoid(s_worse - s_better) ]

p is 1 for human rankings; a soft AI label (Constitutional AI) sets p = P(chosen is better). The same function
is DPO's loss with s = beta * log(pi / pi_ref) (dpo.py). The score is read at the answer's final <|im_end|>.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from omnigpt.align.data import EncodedComparison, batch_indices, comparison_batch, eval_shards
from omnigpt.align.config import RewardConfig
from omnigpt.align.loop import Run
from omnigpt.align.modeling import add_scalar_head, load_policy, scalar_outputs
from omnigpt.train.parallelize import all_reduce_sum


@dataclass
class Pairs:
    better: torch.Tensor  # (P,) row index of the better answer
    worse: torch.Tensor  # (P,) row index of the worse answer
    weight: torch.Tensor  # (P,) 1 / (C(K, 2) * number of elements): weights sum to 1
    p: torch.Tensor  # (P,) probability that `better` is better (1 for rankings)


def ranking_pairs(sizes: list[int], p_chosen: list[float] | None = None, device=None) -> Pairs:
    """All pairs of every element's ranking. Element e owns rows offset_e .. offset_e + K_e - 1, best first."""
    better, worse, weight, p = [], [], [], []
    offset = 0
    for e, K in enumerate(sizes):
        n_pairs = K * (K - 1) // 2
        for i in range(K):
            for j in range(i + 1, K):
                better.append(offset + i)
                worse.append(offset + j)
                weight.append(1.0 / (n_pairs * len(sizes)))
                p.append(p_chosen[e] if p_chosen is not None else 1.0)
        offset += K
    t = lambda x, dt: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
    return Pairs(t(better, torch.long), t(worse, torch.long), t(weight, torch.float32), t(p, torch.float32))


def preference_loss(scores: torch.Tensor, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Bradley-Terry loss, per-pair correctness: 1 if the better answer scores higher, 0.5 on a tie, else 0,
    per-pair negative log-likelihood)."""
    margin = scores[pairs.better] - scores[pairs.worse]
    nll = -(pairs.p * F.logsigmoid(margin) + (1 - pairs.p) * F.logsigmoid(-margin))
    correct = (margin > 0).float() + 0.5 * (margin == 0).float()
    return (pairs.weight * nll).sum(), correct, nll


@torch.no_grad()
def pairwise_eval(score_fn, items: list[EncodedComparison], run: Run, pad_id: int, prefix: str = "val") -> dict[str, float]:
    """Pairwise accuracy (over all pairs of all held-out comparisons) and mean loss, over all ranks."""
    acc = torch.zeros(4, dtype=torch.float64, device=run.device)  # correct pairs, pairs, element losses, elements
    for idx, w in eval_shards(len(items), run.tc.batch_size, run.info.rank, run.info.world_size):
        batch, sizes, p = comparison_batch([items[i] for i in idx], pad_id)
        pairs = ranking_pairs(sizes, p, run.device)
        with run.autocast():
            scores = score_fn(batch.to(run.device))
        _, correct, nll = preference_loss(scores, pairs)
        n_pairs = torch.tensor([k * (k - 1) // 2 for k in sizes], device=run.device)
        keep = torch.repeat_interleave(torch.tensor(w, device=run.device), n_pairs)  # 0 on padding elements
        per_element = keep / torch.repeat_interleave(n_pairs, n_pairs)
        acc += torch.stack([(correct * keep).sum(), keep.sum(), (nll * per_element).sum(), torch.tensor(sum(w), device=run.device)]).double()
    all_reduce_sum(acc, run.info)
    return {f"{prefix}_accuracy": (acc[0] / acc[1]).item(), f"{prefix}_loss": (acc[2] / acc[3]).item()}


def train_reward(model_path, tok, train: list[EncodedComparison], val: list[EncodedComparison] | None, tc: RewardConfig,
                 resume: bool = False, info=None) -> dict:
    """Initialise from a policy (usually the SFT model), train the scalar head and the whole network."""
    run = Run("reward", tc, resume, info)
    model = add_scalar_head(load_policy(model_path))
    cfg = model.cfg
    model = run.prepare(model)
    opt = run.optimizer(model)
    params = [p for p in model.parameters() if p.requires_grad]
    run.restore(model, opt, cfg)
    score = lambda b: scalar_outputs(model, b)[1]  # noqa: E731
    n_pairs = sum(len(c.answers) * (len(c.answers) - 1) // 2 for c in train)
    run.say(f"reward: {len(train)} comparisons ({n_pairs} pairs); {run.info.world_size} rank(s)")
    record = {}
    while run.step < tc.steps:
        lr = run.set_lr(opt)
        idx = batch_indices(len(train), run.step, tc.batch_size, run.info.rank, run.info.world_size, tc.seed)
        batch, sizes, p = comparison_batch([train[i] for i in idx], tok.pad_id)
        pairs = ranking_pairs(sizes, p, run.device)
        with run.autocast():
            scores = score(batch.to(run.device))
        loss, correct, _ = preference_loss(scores, pairs)
        gnorm = run.update(loss, opt, params)
        run.step += 1
        record = run.reduce({"loss": loss.item(), "accuracy": correct.mean().item(), "score_mean": scores.mean().item(),
                             "score_std": scores.std().item() if scores.numel() > 1 else 0.0})
        record.update(lr=lr, grad_norm=gnorm)
        if val and run.due(tc.eval_every):
            model.eval()
            record.update(pairwise_eval(score, val, run, tok.pad_id))
            model.train()
        run.log(record)
        run.maybe_checkpoint(model, opt, cfg)
    run.export(model, cfg, tok, {"stage": "reward", "head": "scalar"})
    return record
