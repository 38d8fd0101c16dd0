"""Batched generation with a KV cache: prompts of different lengths, per-prompt sampling settings.

This is the simple offline path (a fixed batch that runs until every row stops); the serving engine
reuses the same cache, sampling and stop logic with requests joining and leaving every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from omnigpt.infer.sampling import (
    SamplingParams, StopChecker, apply_penalties, filter_logits, make_generator, sample, stack_params,
)
from omnigpt.model.transformer import KVCache, Transformer


@dataclass
class Generation:
    tokens: list[int]
    text: str | None
    finish_reason: str  # "stop" (a stop token or string) or "length"


def next_token_logits(model: Transformer, tokens_BT: torch.Tensor, pos_BT: torch.Tensor, cache: KVCache) -> torch.Tensor:
    return model(tokens_BT, pos_BT=pos_BT, cache=cache).logits.float()


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams] = SamplingParams(),
    *,
    eos_ids: tuple[int, ...] = (),
    decode: Callable[[list[int]], str] | None = None,
    vocab_size: int | None = None,
) -> list[Generation]:
    """Generate a continuation of each prompt. Stop strings need `decode` (token ids -> text).
    `vocab_size` (the tokenizer's) keeps sampling off the padding ids a model's embedding table has past it."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    B = len(prompts)
    params = params if isinstance(params, list) else [params] * B
    if any(p.stop for p in params) and decode is None:
        raise ValueError("stop strings need a decode function")
    device = model.head_weight().device
    lengths = [len(p) for p in prompts]
    max_new = max(p.max_new_tokens for p in params)
    total = max(lengths) + max_new
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({max(lengths)} tokens) + max_new_tokens ({max_new}) exceeds the context of {model.cfg.max_seq_len}")
    cache = KVCache(model.cfg, B, total, device=device, dtype=model.head_weight().dtype)

    V = model.cfg.vocab_size
    settings = stack_params(params, device)
    greedy = [p.greedy for p in params]
    generators = [make_generator(p.seed, device) for p in params]
    seen = torch.zeros(B, V, dtype=torch.bool, device=device)
    counts = torch.zeros(B, V, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        seen[b, torch.tensor(p, device=device)] = True

    # Prefill, right-padded: row b's real tokens sit at positions 0..len_b-1; pads beyond are never attended.
    tokens = torch.zeros(B, max(lengths), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p, device=device)
    pos = torch.arange(max(lengths), device=device).expand(B, -1)
    logits_BTV = next_token_logits(model, tokens, pos, cache)
    last = torch.tensor(lengths, device=device) - 1
    logits = logits_BTV[torch.arange(B, device=device), last]

    outputs: list[list[int]] = [[] for _ in range(B)]
    finish: list[str | None] = [None] * B
    for b, p in enumerate(params):
        if p.max_new_tokens == 0:
            finish[b] = "length"
    stop_checkers = [StopChecker(p.stop) for p in params]
    texts: list[str | None] = [None] * B
    pos_B = last.clone()
    while not all(finish):
        if vocab_size is not None and vocab_size < V:
            logits[:, vocab_size:] = float("-inf")
        logits = apply_penalties(logits, seen, counts, settings["repetition_penalty"], settings["presence_penalty"], settings["frequency_penalty"])
        logits = filter_logits(logits, settings["temperature"], settings["top_k"], settings["top_p"], settings["min_p"])
        next_B = sample(logits, greedy, generators)
        for b, tok in enumerate(next_B.tolist()):
            if finish[b]:
                continue
            outputs[b].append(tok)
            seen[b, tok] = True
            counts[b, tok] += 1
            if tok in eos_ids or tok in params[b].stop_token_ids:
                finish[b] = "stop"
            elif params[b].stop:
                cut = stop_checkers[b].find(decode(outputs[b]))
                if cut is not None:
                    texts[b] = decode(outputs[b])[:cut]
                    finish[b] = "stop"
            if not finish[b] and len(outputs[b]) >= params[b].max_new_tokens:
                finish[b] = "length"
        if all(finish):
            break
        pos_B = pos_B + 1
        logits = next_token_logits(model, next_B.unsqueeze(1), pos_B.unsqueeze(1), cache)[:, -1]

    results = []
    for b in range(B):
        toks = outputs[b]
        if decode is not None and texts[b] is None:
            body = toks[:-1] if toks and (toks[-1] in eos_ids or toks[-1] in params[b].stop_token_ids) else toks
            texts[b] = decode(body)
        results.append(Generation(tokens=toks, text=texts[b], finish_reason=finish[b]))
    return results
