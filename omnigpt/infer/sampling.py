"""Turning next-token logits into tokens: penalties, temperature, top-k, top-p, min-p, seeded sampling.

Every function works on a batch whose rows may have different settings (one row per request in the
serving engine), so settings arrive as (B,) tensors. Shape legend: B rows, V vocabulary.
Order of operations follows HF `generate`: penalties, then temperature, top-k, top-p, min-p.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/CTRL style, over prompt and generated tokens
    presence_penalty: float = 0.0  # OpenAI style, over generated tokens
    frequency_penalty: float = 0.0
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        self.stop_token_ids = tuple(self.stop_token_ids)
        checks = [
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (self.top_k >= 0, "top_k", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (self.max_new_tokens >= 0, "max_new_tokens", "must be >= 0"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} {why}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def stack_params(params: list[SamplingParams], device) -> dict[str, torch.Tensor]:
    """Per-row settings as (B,) tensors for the vectorised functions below."""
    def col(name, dtype=torch.float32):
        return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=device)

    return {
        "temperature": col("temperature"), "top_k": col("top_k", torch.long), "top_p": col("top_p"),
        "min_p": col("min_p"), "repetition_penalty": col("repetition_penalty"),
        "presence_penalty": col("presence_penalty"), "frequency_penalty": col("frequency_penalty"),
    }


def apply_penalties(logits_BV, seen_BV, counts_BV, rep_B, presence_B, frequency_B):
    """seen_BV: token appeared in prompt or output (repetition penalty); counts_BV: times generated so far."""
    if bool((rep_B == 1).all() & (presence_B == 0).all() & (frequency_B == 0).all()):
        return logits_BV  # the common case costs nothing
    rep = rep_B.unsqueeze(1)
    penalised = torch.where(logits_BV > 0, logits_BV / rep, logits_BV * rep)
    logits_BV = torch.where(seen_BV, penalised, logits_BV)
    counts = counts_BV.to(logits_BV.dtype)
    return logits_BV - presence_B.unsqueeze(1) * (counts > 0) - frequency_B.unsqueeze(1) * counts


def filter_logits(logits_BV, temperature_B, top_k_B, top_p_B, min_p_B):
    """Temperature then top-k, top-p and min-p masking (masked entries become -inf). Greedy rows pass through."""
    t = torch.where(temperature_B > 0, temperature_B, torch.ones_like(temperature_B))
    logits_BV = logits_BV / t.unsqueeze(1)
    V = logits_BV.shape[-1]
    if bool((top_k_B > 0).any()):
        k = torch.where(top_k_B > 0, top_k_B.clamp(max=V), torch.full_like(top_k_B, V))
        kth_B = logits_BV.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1).clamp(max=int(k.max()) - 1))
        kth_B = torch.where(top_k_B.unsqueeze(1) > 0, kth_B, torch.full_like(kth_B, float("-inf")))
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B, float("-inf"))
    if bool((top_p_B < 1).any()) or bool((min_p_B > 0).any()):
        sorted_BV, _ = logits_BV.sort(dim=-1, descending=True)
        # top-p: keep the smallest prefix whose mass reaches p (the token that crosses p is kept).
        probs = sorted_BV.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        keep = mass_before < top_p_B.unsqueeze(1)
        threshold_B = sorted_BV.masked_fill(~keep, float("inf")).min(dim=-1, keepdim=True).values
        logits_BV = logits_BV.masked_fill(logits_BV < threshold_B, float("-inf"))
        # min-p: drop tokens whose probability is below min_p times the top token's.
        probs = logits_BV.softmax(dim=-1)
        floor = min_p_B.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        logits_BV = logits_BV.masked_fill(probs < floor, float("-inf"))
    return logits_BV


def sample(logits_BV, greedy_B, generators: list[torch.Generator | None] | None = None):
    """Greedy rows take the argmax; others draw from softmax(logits) with their own generator (seeded runs
    reproduce whatever else is in the batch)."""
    out = logits_BV.argmax(dim=-1)
    probs = logits_BV.float().softmax(dim=-1)
    for b in range(logits_BV.shape[0]):
        if not bool(greedy_B[b]):
            g = generators[b] if generators else None
            out[b] = torch.multinomial(probs[b], 1, generator=g)[0]
    return out


def make_generator(seed: int | None, device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


@dataclass
class StopChecker:
    """Detects stop strings in a growing text; returns the text cut just before the first stop string."""

    stops: tuple[str, ...] = field(default_factory=tuple)

    def find(self, text: str) -> int | None:
        hits = [text.find(s) for s in self.stops if s and s in text]
        return min(hits) if hits else None
