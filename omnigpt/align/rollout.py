"""Sampling responses with the inference engine's batched KV-cache generation, rewards, and the verified score.

Rollouts go through `omnigpt.infer.generate.generate` (one batch, per-row sampling, KV cache). Under FSDP every rank
must run the same number of forward passes, so there (`lockstep=True`) generation ignores <|im_end|> and always
runs max_new_tokens steps; responses are cut after their first <|im_end|> either way, so the result is the same.
Per-token log-probabilities of the sampled tokens come from one forward pass over prompt + response afterwards.
"""

from __future__ import annotations

import contextlib
import random
from collections import defaultdict

import torch

from omnigpt.align.data import Prompt, encode_prompt, make_batch
from omnigpt.align.modeling import response_logprobs, scalar_outputs
from omnigpt.data.chat_tasks import check
from omnigpt.infer.generate import generate
from omnigpt.infer.sampling import SamplingParams


class TextVocab:
    """The model as `generate` sees it, with logits past the tokenizer's n_vocab ids (embedding padding) at -inf."""

    def __init__(self, model, n_vocab: int):
        self.model, self.n_vocab, self.cfg = model, n_vocab, model.cfg

    def head_weight(self):
        return self.model.head_weight()

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        out.logits[..., self.n_vocab:] = float("-inf")
        return out


def sample_responses(model, prompts: list[list[int]], tok, *, max_new_tokens: int, temperature: float = 1.0,
                     lockstep: bool = False, autocast=contextlib.nullcontext) -> list[list[int]]:
    """One response per prompt, each ending at (and including) its first <|im_end|>, or cut at max_new_tokens."""
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)
    eos_id = tok.im_end_id
    with torch.no_grad(), autocast():
        gens = generate(TextVocab(model, tok.vocab_size), prompts, params, eos_ids=() if lockstep else (eos_id,))
    return [g.tokens[: g.tokens.index(eos_id) + 1] if eos_id in g.tokens else g.tokens for g in gens]


def response_text(tok, response: list[int]) -> str:
    body = response[:-1] if response and response[-1] == tok.im_end_id else response
    return tok.decode(body)


def fits(prompts: list[list[int]], max_new_tokens: int, limit: int) -> list[int]:
    """Indices of the prompts that leave room for max_new_tokens within `limit` tokens."""
    return [i for i, p in enumerate(prompts) if len(p) + max_new_tokens <= limit]


def fitting_prompts(prompts: list[list[int]], max_new_tokens: int, limit: int) -> list[int]:
    """`fits`, for callers that cannot go on without any prompt: none fitting is an error, not an empty run."""
    keep = fits(prompts, max_new_tokens, limit)
    if not keep:
        raise ValueError(f"no prompt leaves room for {max_new_tokens} new tokens within {limit}")
    return keep


class RewardFn:
    """Scores of sampled responses: a reward model's score at the final token, or the task verifier (1 or 0)."""

    def __init__(self, tok, reward_model=None, verifier: bool = False):
        if (reward_model is None) == (not verifier):
            raise ValueError("give a reward model or use the verifier (exactly one)")
        self.tok, self.model, self.verifier = tok, reward_model, verifier

    @torch.no_grad()
    def __call__(self, batch, responses: list[list[int]], prompts: list[Prompt]) -> torch.Tensor:
        if self.verifier:
            return torch.tensor([float(check(p.task, response_text(self.tok, r))) for p, r in zip(prompts, responses)],
                                device=batch.ids.device)
        return scalar_outputs(self.model, batch)[1]


def verified(tok, responses: list[list[int]], prompts: list[Prompt]) -> list[float]:
    """1/0 per response whose prompt has a task spec (others are left out)."""
    return [float(check(p.task, response_text(tok, r))) for p, r in zip(prompts, responses) if p.task]


def sampled_chunks(model, tok, ids: list[list[int]], rows: list[int], *, batch_size: int, seed: int,
                   max_new_tokens: int, temperature: float, autocast):
    """Yield (prompt indices, sampled responses) batch by batch, under a seeded RNG that leaves the caller's alone."""
    device = model.head_weight().device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for k in range(0, len(rows), batch_size):
            chunk = rows[k:k + batch_size]
            yield chunk, sample_responses(model, [ids[i] for i in chunk], tok, max_new_tokens=max_new_tokens,
                                          temperature=temperature, autocast=autocast)


@torch.no_grad()
def evaluate_policy(model, tok, prompts: list[Prompt], *, samples: int = 1, temperature: float = 1.0,
                    max_new_tokens: int = 64, ref=None, batch_size: int = 64, seed: int = 0,
                    autocast=contextlib.nullcontext) -> dict:
    """The verified score on `prompts` (each needs a task spec): the fraction of sampled replies the checker accepts,
    overall and per task kind; mean response length and how often the reply ended by itself; with `ref`, the KL
    KL(pi || pi_ref) per response estimated from the samples (sum over tokens of log pi - log pi_ref; temperature 1
    only, where the samples come from pi itself)."""
    if any(not p.task for p in prompts):
        raise ValueError("the verified score needs a task spec on every prompt (make them with `omnigpt align tasks`)")
    device = model.head_weight().device
    ids = [encode_prompt(tok, p.messages) for p in prompts]
    keep = fitting_prompts(ids, max_new_tokens, model.cfg.max_seq_len)
    rows = [i for i in keep for _ in range(samples)]
    by_kind, lengths, ended, kls = defaultdict(list), [], [], []
    for chunk, resp in sampled_chunks(model, tok, ids, rows, batch_size=batch_size, seed=seed,
                                      max_new_tokens=max_new_tokens, temperature=temperature, autocast=autocast):
        for i, r in zip(chunk, resp):
            ok = check(prompts[i].task, response_text(tok, r))
            by_kind[prompts[i].task.get("kind", "?")].append(float(ok))
            lengths.append(len(r))
            ended.append(float(r[-1] == tok.im_end_id))
        if ref is not None and temperature == 1.0:
            batch = make_batch([ids[i] for i in chunk], resp, pad_id=tok.pad_id).to(device)
            with autocast():
                kl = (response_logprobs(model, batch, tok.vocab_size) - response_logprobs(ref, batch, tok.vocab_size)).sum(-1)
            kls.extend(kl.tolist())
    every = [x for v in by_kind.values() for x in v]
    out = {"score": sum(every) / len(every), "n": len(every), "skipped_prompts": len(prompts) - len(keep),
           "length": sum(lengths) / len(lengths), "eos_rate": sum(ended) / len(ended)}
    out.update({f"score_{k}": sum(v) / len(v) for k, v in sorted(by_kind.items())})
    if kls:
        out["kl"] = sum(kls) / len(kls)
    return out


@torch.no_grad()
def verifier_comparisons(model, tok, prompts: list[Prompt], *, samples: int = 4, temperature: float = 1.0,
                         max_new_tokens: int = 64, batch_size: int = 64, seed: int = 0,
                         autocast=contextlib.nullcontext) -> list[dict]:
    """Preference pairs between the policy's own answers, labelled by the task verifier: the checker plays the
    labeler who compares model outputs in InstructGPT. Each prompt gets `samples` answers; one that passes and one
    that fails make a comparison {"prompt", "chosen", "rejected", "task"}. Prompts whose answers all pass or all fail
    give none."""
    if any(not p.task for p in prompts):
        raise ValueError("labelling with the verifier needs a task spec on every prompt")
    ids = [encode_prompt(tok, p.messages) for p in prompts]
    keep = fits(ids, max_new_tokens, model.cfg.max_seq_len)
    rows = [i for i in keep for _ in range(samples)]
    answers: dict[int, list[str]] = defaultdict(list)
    for chunk, resp in sampled_chunks(model, tok, ids, rows, batch_size=batch_size, seed=seed,
                                      max_new_tokens=max_new_tokens, temperature=temperature, autocast=autocast):
        for i, r in zip(chunk, resp):
            answers[i].append(response_text(tok, r).strip())
    rng = random.Random(seed)
    out = []
    for i in keep:
        good = [a for a in answers[i] if check(prompts[i].task, a)]
        bad = [a for a in answers[i] if not check(prompts[i].task, a)]
        if good and bad:
            out.append({"prompt": prompts[i].messages, "chosen": rng.choice(good), "rejected": rng.choice(bad),
                        "task": prompts[i].task})
    return out
