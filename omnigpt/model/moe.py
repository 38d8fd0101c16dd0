"""Mixture-of-Experts feed-forward: top-k token-choice routing, dropless dispatch, grouped expert matmuls.

Shape legend: T tokens (batch and time flattened), D model width, E experts, K experts per token,
F expert hidden width, N = T*K routed (token, expert) pairs.

Weight layout matches Hugging Face Mixtral / Qwen3-MoE in memory (transformers 5): `w_gate_up` is (E, 2F, D)
with the gate rows first, `w_down` is (E, D, F); both are used as `x @ w.T`, per expert.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from omnigpt.config import ModelConfig


class TopKRouter(nn.Module):
    """Softmax router choosing k experts per token.

    With `norm_topk` the k chosen probabilities are renormalised to sum to one: this is Mixtral's
    "softmax over the chosen k logits" and Qwen3-MoE's `norm_topk_prob=True` (the two are the same function).
    Without it the weights stay the full-softmax probabilities (Qwen3-MoE `norm_topk_prob=False`).
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, norm_topk: bool = True):
        super().__init__()
        self.top_k, self.norm_topk = top_k, norm_topk
        self.gate = nn.Linear(d_model, n_experts, bias=False)

    def forward(self, x_TD: torch.Tensor):
        logits_TE = self.gate(x_TD).float()
        probs_TE = logits_TE.softmax(dim=-1)
        weights_TK, experts_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.norm_topk:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return weights_TK, experts_TK, logits_TE, probs_TE


def grouped_mm_available(x: torch.Tensor) -> bool:
    # torch._grouped_mm is the fast path on Hopper-class GPUs with bf16; elsewhere the per-expert loop is exact.
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def expert_mlp_loop(x_ND: torch.Tensor, counts_E: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """Reference path: one SwiGLU matmul pair per expert on its contiguous slice of sorted tokens."""
    outs = []
    for e, x_e in enumerate(torch.split(x_ND, counts_E.tolist())):
        gate, up = F.linear(x_e, w_gate_up[e]).chunk(2, dim=-1)
        outs.append(F.linear(F.silu(gate) * up, w_down[e]))
    return torch.cat(outs) if outs else x_ND.new_zeros(0, w_down.shape[1])


def expert_mlp_grouped(x_ND: torch.Tensor, counts_E: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """All experts in two grouped GEMMs: rows [offs[e-1], offs[e]) of x belong to expert e."""
    offs = counts_E.cumsum(0).to(torch.int32)
    h = torch._grouped_mm(x_ND, w_gate_up.transpose(-2, -1), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, w_down.transpose(-2, -1), offs=offs)


class PermuteRows(torch.autograd.Function):
    """x[index] for a permutation `index` whose inverse is `inverse`: the backward is a gather too.

    Autograd's own backward of x[index] scatters with atomic adds (it cannot know the rows are distinct);
    a permutation's gradient is just the inverse gather, deterministic and without atomics.
    """

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x[index]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


class MoE(nn.Module):
    """Dropless MoE: every (token, expert) pair is computed; no capacity factor, no token dropping."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, Fe = cfg.n_experts, cfg.d_model, cfg.d_ff_expert
        self.n_experts, self.top_k = E, cfg.top_k
        self.aux_loss_coef, self.z_loss_coef = cfg.aux_loss_coef, cfg.z_loss_coef
        self.router = TopKRouter(D, E, cfg.top_k, cfg.norm_topk)
        self.w_gate_up = nn.Parameter(torch.empty(E, 2 * Fe, D))
        self.w_down = nn.Parameter(torch.empty(E, D, Fe))
        self.use_grouped_mm = True  # set False to force the reference loop (tests, debugging)

    def expert_mlp(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        w_gate_up, w_down = self.w_gate_up, self.w_down
        if torch.is_autocast_enabled(x_ND.device.type):
            dtype = torch.get_autocast_dtype(x_ND.device.type)
            x_ND, w_gate_up, w_down = x_ND.to(dtype), w_gate_up.to(dtype), w_down.to(dtype)
        if self.use_grouped_mm and grouped_mm_available(x_ND):
            return expert_mlp_grouped(x_ND, counts_E, w_gate_up, w_down)
        return expert_mlp_loop(x_ND, counts_E, w_gate_up, w_down)

    def forward(self, x: torch.Tensor):
        """x: (..., D). Returns (y like x, aux loss scalar, per-expert load (E,) as fractions of routed pairs)."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        weights_TK, experts_TK, logits_TE, probs_TE = self.router(x_TD)

        # Group the T*K (token, expert) pairs by expert; a stable sort keeps token order inside each group.
        experts_N = experts_TK.reshape(-1)
        order_N = experts_N.argsort(stable=True)
        # Not bincount: its output shape depends on the data, which breaks the torch.compile graph at every layer.
        counts_E = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).scatter_add_(0, experts_N, torch.ones_like(experts_N))

        # Every token appears K times: repeat, permute into expert order and back, then a weighted sum over K.
        # Gathers only, forward and backward (the repeat's gradient is a sum over K): the index_add_ combine this
        # replaced cost 5% of an H100 MoE train step in atomic adds and its removal gave +5% tokens/s.
        inverse_N = torch.empty_like(order_N).scatter_(0, order_N, torch.arange(order_N.numel(), device=x.device))
        x_ND = PermuteRows.apply(x_TD.repeat_interleave(self.top_k, dim=0), order_N, inverse_N)
        y_ND = PermuteRows.apply(self.expert_mlp(x_ND, counts_E), inverse_N, order_N)
        y_TKD = y_ND.view(-1, self.top_k, y_ND.shape[-1])
        y_TD = (y_TKD * weights_TK.unsqueeze(-1).to(y_TKD.dtype)).sum(1).to(x.dtype)

        load_E = counts_E.float() / experts_N.numel()
        aux = x.new_zeros((), dtype=torch.float32)
        if self.training and self.aux_loss_coef:
            # Switch Transformer: E * sum_e (fraction routed to e) * (mean router prob of e); 1.0 when balanced.
            aux = aux + self.aux_loss_coef * self.n_experts * (load_E * probs_TE.mean(0)).sum()
        if self.training and self.z_loss_coef:
            aux = aux + self.z_loss_coef * torch.logsumexp(logits_TE, dim=-1).square().mean()
        return y_TD.view(shape), aux, load_E.detach()
