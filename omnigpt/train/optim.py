"""Optimizers and learning-rate schedules.

AdamW (torch's, fused on CUDA) for everything, or Muon for the hidden 2-D weight matrices of the blocks with AdamW
for the rest (embeddings, norms, output head, MoE router). Muon (Keller Jordan, 2024) is written here in a few lines:
SGD momentum whose update matrix is replaced by the nearest semi-orthogonal matrix, computed with a quintic
Newton-Schulz iteration. MoE expert weights (E, out, in) are orthogonalised per expert (batched over E).

The schedule is a pure function of the step (`lr_factor`), so its whole state is the step number.
"""

from __future__ import annotations

import math

import torch

try:  # DTensor: FSDP2 parameters and their gradients
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover
    DTensor, Replicate = (), None


# ---- schedules -------------------------------------------------------------------------------------------------
def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine", min_ratio: float = 0.1,
              decay_frac: float = 0.2) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based) of `total`.

    cosine: linear warmup, then cosine from 1 down to min_ratio at the last step.
    wsd: linear warmup, stable at 1, then linear decay to min_ratio over the last `decay_frac` of the steps
    (warmup-stable-decay: the stable phase can be extended and branched from, as in MiniCPM / DeepSeek)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        span = max(1, total - warmup - 1)
        progress = min(1.0, (step - warmup) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(1, int(round(decay_frac * total)))
        decay_start = max(warmup, total - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / max(1, total - decay_start))
        return 1.0 - (1.0 - min_ratio) * progress
    raise ValueError(f"unknown schedule {schedule!r}; choose cosine or wsd")


def set_lr(optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


# ---- Muon ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T for G = U S V^T, batched over leading dims. The quintic coefficients (3.4445, -4.7750,
    2.0315) push singular values towards ~1 fast rather than exactly (Keller Jordan's tuning). bf16 on GPU as in
    the reference; float32 on CPU so CPU runs stay exact and deterministic."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if G.is_cuda else G.float()
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the short side: X X^T is the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return (X.mT if tall else X).to(G.dtype)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole matrix on every rank: Newton-Schulz needs all of it, FSDP2 holds a row shard."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Back to ref's layout: a Replicate -> Shard redistribution is a local slice, no communication."""
    if isinstance(ref, DTensor):
        rep = DTensor.from_local(full, ref.device_mesh, [Replicate()] * ref.device_mesh.ndim, run_check=False)
        return rep.redistribute(ref.device_mesh, ref.placements)
    return full


class Muon(torch.optim.Optimizer):
    """Momentum (Nesterov) + orthogonalised update for matrices (last two dims), decoupled weight decay.

    The update is scaled by sqrt(max(1, rows/cols)) so tall matrices get the same per-element RMS as square ones.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - mom)  # buf = mom * buf + (1 - mom) * g
                update = g.lerp(buf, mom) if group["nesterov"] else buf
                full = newton_schulz(_full(update), group["ns_steps"])
                full = full * math.sqrt(max(1.0, full.size(-2) / full.size(-1)))
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(_like(full, p), alpha=-lr)
        return None


class Optimizers:
    """Several optimizers stepped as one (Muon for matrices + AdamW for the rest)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self):
        merged = {}
        for o in self.optimizers:
            merged.update(o.state)
        return merged

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


# ---- building ------------------------------------------------------------------------------------------------
def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """Hidden matrices of the transformer blocks: attention, MLP and expert weights; not the router (a small
    classifier, kept on AdamW as in Moonlight/Kimi), not norms, embeddings or the head."""
    return name.startswith("layers.") and p.ndim >= 2 and ".router." not in name


def build_optimizer(model: torch.nn.Module, kind: str = "adamw", lr: float = 3e-4, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), muon_lr: float = 0.02, muon_momentum: float = 0.95):
    """AdamW, or Muon + AdamW. Weight decay only on matrices (norm gains are not decayed).

    Every group carries `base_lr`: the schedule sets lr = base_lr * factor."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    fused = all(p.is_cuda for _, p in named)  # fused AdamW: one kernel for all params (CUDA); foreach elsewhere
    kw = dict(betas=betas, eps=1e-8, fused=True) if fused else dict(betas=betas, eps=1e-8, foreach=True)

    def adamw(params):
        # foreach/fused kernels cannot mix DTensors (FSDP shards) with plain tensors (expert-parallel weights) in one
        # group, so each kind gets its own groups.
        groups = []
        for sharded in (True, False):
            for decay in (True, False):
                ps = [p for _, p in params if isinstance(p, DTensor) == sharded and (p.ndim >= 2) == decay]
                if ps:
                    groups.append(dict(params=ps, weight_decay=weight_decay if decay else 0.0))
        opt = torch.optim.AdamW(groups, lr=lr, **kw)
        for g in opt.param_groups:
            g["base_lr"] = lr
        return opt

    if kind == "adamw":
        return adamw(named)
    if kind == "muon":
        matrices = [(n, p) for n, p in named if is_muon_param(n, p)]
        rest = [(n, p) for n, p in named if not is_muon_param(n, p)]
        muon = Muon([p for _, p in matrices], lr=muon_lr, momentum=muon_momentum, weight_decay=weight_decay)
        for g in muon.param_groups:
            g["base_lr"] = muon_lr
        return Optimizers([muon, adamw(rest)])
    raise ValueError(f"unknown optimizer {kind!r}; choose adamw or muon")


def optimizer_list(optimizer) -> list[torch.optim.Optimizer]:
    return optimizer.optimizers if isinstance(optimizer, Optimizers) else [optimizer]
