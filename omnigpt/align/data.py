"""Alignment data: JSONL readers that name the bad line, chat encoding, SFT packing, batching.

File formats (one JSON object per line; blank lines are skipped; other keys, e.g. "task", are kept):

    demonstrations (SFT)   {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...]}
    comparisons            {"prompt": messages, "chosen": answer, "rejected": answer}  (optional "p_chosen": a soft
                            label in [0, 1], e.g. from AI feedback), or {"prompt": messages, "ranking": [best, ..., worst]}
    prompts (PPO, GRPO)    {"messages": messages} or {"prompt": messages}; trailing assistant turns are dropped, so
                            demonstration files double as prompt files

An *answer* is a string (one assistant message), one message, or a list of messages ending with an assistant turn.
A prompt may also be a plain string (one user message).

Token layout. A conversation is `render_chat(prompt + answer)` cut just after the answer's last <|im_end|>: the
prompt part is exactly `render_chat(prompt, add_generation_prompt=True)`, so sampled responses (the policy's own
tokens, ending in <|im_end|>) and encoded answers line up token for token. A reward model reads its score at the
last token (that <|im_end|>).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from omnigpt.tokenizer.chat import ROLES, content_text, render_chat

IGNORE = -100
MAX_REPORTED = 10


class DataError(ValueError):
    """Bad records, each named by file and line number."""


# ---- reading and validating ------------------------------------------------------------------------------------
def _read_jsonl(path: str | Path, parse) -> list:
    """parse(obj) -> item, raising ValueError with a reason; all bad lines are reported together."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    items, errors = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"line {lineno}: not valid JSON ({e.msg} at column {e.colno})")
                continue
            try:
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                item = parse(obj)
                item.line = lineno
                items.append(item)
            except (ValueError, TypeError, KeyError) as e:
                errors.append(f"line {lineno}: {e}")
    if errors:
        more = f"\n  ... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
        raise DataError(f"{path}: {len(errors)} bad line(s):\n  " + "\n  ".join(errors[:MAX_REPORTED]) + more)
    if not items:
        raise DataError(f"{path}: no records (the file is empty)")
    return items


def check_messages(messages, what: str = "messages") -> list[dict]:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{what} must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"{what}[{i}]: each message needs a role, one of {', '.join(ROLES)}")
        content_text(m.get("content"))  # raises on unsupported content parts
    return messages


def check_answer(answer, what: str) -> list[dict]:
    if isinstance(answer, str):
        answer = [{"role": "assistant", "content": answer}]
    elif isinstance(answer, dict):
        answer = [answer]
    answer = check_messages(answer, what)
    if answer[-1]["role"] != "assistant":
        raise ValueError(f"{what} must end with an assistant message")
    return answer


@dataclass
class Conversation:
    messages: list[dict]
    meta: dict = field(default_factory=dict)
    line: int = 0


@dataclass
class Comparison:
    prompt: list[dict]
    answers: list[list[dict]]  # best first
    p_chosen: float = 1.0  # K=2 only: probability that answers[0] is the better one (soft label)
    meta: dict = field(default_factory=dict)
    line: int = 0


@dataclass
class Prompt:
    messages: list[dict]
    task: dict | None = None
    line: int = 0


def parse_conversation(obj: dict) -> Conversation:
    if "messages" not in obj:
        raise ValueError('no "messages" key')
    messages = check_messages(obj["messages"])
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("conversation has no assistant turn: nothing to learn from")
    return Conversation(messages, {k: v for k, v in obj.items() if k != "messages"})


def parse_comparison(obj: dict) -> Comparison:
    if "prompt" not in obj:
        raise ValueError('no "prompt" key')
    prompt = check_messages(obj["prompt"], "prompt")
    if "ranking" in obj:
        if not isinstance(obj["ranking"], list) or len(obj["ranking"]) < 2:
            raise ValueError('"ranking" must list at least 2 answers, best first')
        answers = [check_answer(a, f"ranking[{i}]") for i, a in enumerate(obj["ranking"])]
    elif "chosen" in obj and "rejected" in obj:
        answers = [check_answer(obj["chosen"], "chosen"), check_answer(obj["rejected"], "rejected")]
    else:
        raise ValueError('a comparison needs "chosen" and "rejected", or "ranking"')
    keys = [json.dumps(a, sort_keys=True) for a in answers]
    for i in range(len(keys)):
        for j in range(i):
            if keys[i] == keys[j]:
                which = "chosen and rejected answers are identical" if "ranking" not in obj else f"ranking[{j}] and ranking[{i}] are identical"
                raise ValueError(f"{which}: a comparison needs different answers")
    p = float(obj.get("p_chosen", 1.0))
    if not 0.0 <= p <= 1.0 or ("p_chosen" in obj and len(answers) != 2):
        raise ValueError('"p_chosen" must be in [0, 1] and only goes with chosen/rejected')
    meta = {k: v for k, v in obj.items() if k not in ("prompt", "chosen", "rejected", "ranking", "p_chosen")}
    return Comparison(prompt, answers, p, meta)


def parse_prompt(obj: dict) -> Prompt:
    key = "messages" if "messages" in obj else "prompt"
    if key not in obj:
        raise ValueError('no "messages" or "prompt" key')
    messages = list(check_messages(obj[key], key))
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages:
        raise ValueError("the prompt has only assistant turns: nothing to answer")
    task = obj.get("task")
    if task is not None and not isinstance(task, dict):
        raise ValueError('"task" must be an object')
    return Prompt(messages, task)


def load_conversations(path) -> list[Conversation]:
    return _read_jsonl(path, parse_conversation)


def load_comparisons(path) -> list[Comparison]:
    return _read_jsonl(path, parse_comparison)


def load_prompts(path, need_task: bool = False) -> list[Prompt]:
    prompts = _read_jsonl(path, parse_prompt)
    missing = [p.line for p in prompts if need_task and not p.task]
    if missing:
        raise DataError(f"{path}: line {missing[0]} has no \"task\" spec, which the verifier needs "
                        f"({len(missing)} such lines; make prompts with `omnigpt align tasks`)")
    return prompts


# ---- encoding --------------------------------------------------------------------------------------------------
def encode_prompt(tok, messages: list[dict]) -> list[int]:
    return render_chat(tok, messages, add_generation_prompt=True)[0]


def encode_answer(tok, prompt: list[dict], answer: list[dict]) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, answer ids, answer loss mask): the answer cut just after its last <|im_end|>."""
    p = encode_prompt(tok, prompt)
    ids, mask = render_chat(tok, prompt + answer)
    if ids[: len(p)] != p:  # holds for ChatML: each piece is encoded on its own
        raise ValueError("prompt tokens are not a prefix of the conversation tokens")
    end = len(ids) - ids[::-1].index(tok.im_end_id)
    return p, ids[len(p):end], mask[len(p):end]


@dataclass
class Example:
    """Token ids of one SFT conversation: inputs/targets already shifted, targets IGNORE off the assistant turns."""

    inputs: list[int]
    targets: list[int]


def encode_sft(tok, conv: Conversation, max_len: int) -> tuple[Example | None, bool]:
    """(example or None when no target survives truncation, truncated?)."""
    ids, mask = render_chat(tok, conv.messages)
    inputs, targets = ids[:-1], [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    truncated = len(inputs) > max_len
    inputs, targets = inputs[:max_len], targets[:max_len]
    return (Example(inputs, targets) if any(t != IGNORE for t in targets) else None), truncated


def pack(examples: list[Example], seq_len: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Greedy packing in order into rows of seq_len: (N, T) inputs, targets, doc_ids (-1 padding), pos."""
    rows: list[list[Example]] = []
    used = seq_len + 1
    for ex in examples:
        if used + len(ex.inputs) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += len(ex.inputs)
    out = {k: torch.full((len(rows), seq_len), v, dtype=torch.long) for k, v in
           (("inputs", pad_id), ("targets", IGNORE), ("doc_ids", -1), ("pos", 0))}
    for r, row in enumerate(rows):
        n = 0
        for d, ex in enumerate(row):
            L = len(ex.inputs)
            out["inputs"][r, n:n + L] = torch.tensor(ex.inputs)
            out["targets"][r, n:n + L] = torch.tensor(ex.targets)
            out["doc_ids"][r, n:n + L] = d
            out["pos"][r, n:n + L] = torch.arange(L)
            n += L
    return out


@dataclass
class SeqBatch:
    """Prompts + responses, right-padded to (B, T). Response token j of row b sits at position
    start[b] + j; the logits that predict it are at start[b] + j - 1 (`index`). Shapes: B rows, R = longest response."""

    ids: torch.Tensor  # (B, T)
    index: torch.Tensor  # (B, R) positions of the logits that predict each response token (clamped in padding)
    tokens: torch.Tensor  # (B, R) the response tokens
    mask: torch.Tensor  # (B, R) float: 1 on response tokens that count (assistant tokens), 0 on padding
    last: torch.Tensor  # (B,) position of each row's final token (where a reward model reads its score)

    def to(self, device) -> "SeqBatch":
        return SeqBatch(*(t.to(device) for t in (self.ids, self.index, self.tokens, self.mask, self.last)))

    def select(self, rows) -> "SeqBatch":
        return SeqBatch(self.ids[rows], self.index[rows], self.tokens[rows], self.mask[rows], self.last[rows])


def make_batch(prompts: list[list[int]], responses: list[list[int]], masks: list[list[int]] | None = None,
               pad_id: int = 0) -> SeqBatch:
    if any(not r for r in responses):
        raise ValueError("every response needs at least one token")
    B, R = len(prompts), max(len(r) for r in responses)
    T = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    index = torch.zeros(B, R, dtype=torch.long)
    tokens = torch.full((B, R), pad_id, dtype=torch.long)
    mask = torch.zeros(B, R)
    last = torch.zeros(B, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        P, L = len(p), len(r)
        ids[b, :P + L] = torch.tensor(p + r)
        index[b] = (P - 1 + torch.arange(R)).clamp(max=P + L - 1)
        tokens[b, :L] = torch.tensor(r)
        mask[b, :L] = torch.tensor(masks[b], dtype=torch.float) if masks else 1.0
        last[b] = P + L - 1
    return SeqBatch(ids, index, tokens, mask, last)


@dataclass
class EncodedComparison:
    prompt: list[int]
    answers: list[list[int]]
    masks: list[list[int]]
    p_chosen: float = 1.0


def encode_comparisons(tok, comps: list[Comparison], max_len: int) -> tuple[list[EncodedComparison], int]:
    """Encoded comparisons and how many were skipped for exceeding max_len tokens."""
    out, skipped = [], 0
    for c in comps:
        enc = [encode_answer(tok, c.prompt, a) for a in c.answers]
        if any(len(p) + len(a) > max_len for p, a, _ in enc):
            skipped += 1
            continue
        out.append(EncodedComparison(enc[0][0], [a for _, a, _ in enc], [m for _, _, m in enc], c.p_chosen))
    return out, skipped


def comparison_batch(items: list[EncodedComparison], pad_id: int = 0) -> tuple[SeqBatch, list[int], list[float]]:
    """All answers of all items as one SeqBatch (item by item, best first), the group sizes and soft labels."""
    prompts, responses, masks = [], [], []
    for it in items:
        for a, m in zip(it.answers, it.masks):
            prompts.append(it.prompt)
            responses.append(a)
            masks.append(m)
    return make_batch(prompts, responses, masks, pad_id), [len(it.answers) for it in items], [it.p_chosen for it in items]


# ---- order -----------------------------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, step: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> list[int]:
    """This rank's items at `step`. The items form an endless stream of per-epoch permutations; step k's global batch
    is stream positions [k*G, (k+1)*G) with G = batch_size * world_size, rank r taking the r-th block. A function of
    the step alone, so resuming needs nothing but the step, and 2 ranks x B see what 1 rank x 2B sees."""
    G = batch_size * world_size
    out = []
    for p in range(step * G + rank * batch_size, step * G + (rank + 1) * batch_size):
        epoch, i = divmod(p, n)
        out.append(int(_permutation(n, seed, epoch)[i]))
    return out


def eval_shards(n: int, batch_size: int, rank: int = 0, world_size: int = 1):
    """One pass over n items split over ranks: yields (indices, weights) with the same number of batches on every
    rank (FSDP needs each rank in every forward); padding repeats item 0 with weight 0."""
    mine, first = list(range(rank, n, world_size)), list(range(0, n, world_size))  # rank 0 has the most
    for k in range(-(-len(first) // batch_size)):
        idx = mine[k * batch_size:(k + 1) * batch_size]
        pad = len(first[k * batch_size:(k + 1) * batch_size]) - len(idx)
        yield idx + [0] * pad, [1.0] * len(idx) + [0.0] * pad
