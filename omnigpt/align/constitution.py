"""Constitutional AI (Bai et al. 2022): the model improves its own answers against written principles.

Supervised stage (SL-CAI): for each prompt the model answers, is asked to critique its answer against a principle
drawn at random, then to revise it; the revised answer becomes a demonstration (`revisions.jsonl`, SFT format).

Feedback stage (RL-CAI): the model answers each prompt twice and is asked which answer better follows a principle,
as a multiple choice "(A) ... (B) ..."; the label is the model's own probability of the letter, averaged over both
orders of the two answers (removing position bias). The result is a comparison file with soft labels
(`ai_comparisons.jsonl`: prompt, chosen, rejected, p_chosen) that `omnigpt align reward` trains on.

Principles file: one principle per line ("#" comments and blank lines skipped), or per line a JSON object
{"critique": ..., "revision": ...} with `{principle}`-free request texts of your own (plus an optional "text" used
when judging).
"""

from __future__ import annotations

import contextlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from omnigpt.align.data import DataError, Prompt, encode_prompt
from omnigpt.align.rollout import fits, response_text, sample_responses
from omnigpt.data.chat_tasks import check

CRITIQUE = "Critique your last reply by this principle: {p} Say how the reply breaks it, if it does."
REVISION = "Rewrite your last reply so that it follows the principle: {p} Give only the new reply."
JUDGE = ("Consider this conversation:\n\n{conversation}\n\nWhich reply better follows the principle: {p}\n\n"
         "(A) {a}\n(B) {b}\n\nAnswer with A or B.")


@dataclass
class Principle:
    text: str
    critique: str
    revision: str


def load_principles(path) -> list[Principle]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    out, errors = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
                out.append(Principle(obj.get("text", obj["revision"]), obj["critique"], obj["revision"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                errors.append(f"line {lineno}: a JSON principle needs \"critique\" and \"revision\" ({e})")
        else:
            out.append(Principle(line, CRITIQUE.format(p=line), REVISION.format(p=line)))
    if errors:
        raise DataError(f"{path}: " + "; ".join(errors))
    if not out:
        raise DataError(f"{path}: no principles")
    return out


def _sample(model, tok, convs: list[list[dict]], max_new_tokens: int, temperature: float, batch_size: int, autocast) -> list[str]:
    """One reply per conversation; "" for a conversation too long for the context (callers drop those)."""
    ids = [encode_prompt(tok, c) for c in convs]
    keep = fits(ids, max_new_tokens, model.cfg.max_seq_len)
    out = [""] * len(convs)
    for k in range(0, len(keep), batch_size):
        chunk = keep[k:k + batch_size]
        resp = sample_responses(model, [ids[i] for i in chunk], tok, max_new_tokens=max_new_tokens, temperature=temperature, autocast=autocast)
        for i, r in zip(chunk, resp):
            out[i] = response_text(tok, r).strip()
    return out


@torch.no_grad()
def critique_and_revise(model, tok, prompts: list[Prompt], principles: list[Principle], *, rounds: int = 1,
                        max_new_tokens: int = 64, temperature: float = 0.7, batch_size: int = 32, seed: int = 0,
                        autocast=contextlib.nullcontext) -> list[dict]:
    """Demonstrations {"messages": prompt + [revised answer]}, with the principle, first answer and critiques."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    sample = lambda convs: _sample(model, tok, convs, max_new_tokens, temperature, batch_size, autocast)  # noqa: E731
    answers = sample([p.messages for p in prompts])
    records = [{"initial": a, "principles": [], "critiques": []} for a in answers]
    for _ in range(rounds):
        chosen = [rng.choice(principles) for _ in prompts]
        convs = [p.messages + [{"role": "assistant", "content": a}, {"role": "user", "content": c.critique}]
                 for p, a, c in zip(prompts, answers, chosen)]
        critiques = sample(convs)
        convs = [c + [{"role": "assistant", "content": k}, {"role": "user", "content": pr.revision}]
                 for c, k, pr in zip(convs, critiques, chosen)]
        answers = [a if k else "" for a, k in zip(sample(convs), critiques)]  # no critique (too long): no revision
        for r, pr, k in zip(records, chosen, critiques):
            r["principles"].append(pr.text)
            r["critiques"].append(k)
    out = []
    for p, a, r in zip(prompts, answers, records):
        if a:  # an empty revision teaches nothing
            out.append({"messages": p.messages + [{"role": "assistant", "content": a}], **r, **({"task": p.task} if p.task else {})})
    return out


def render_transcript(messages: list[dict]) -> str:
    return "\n".join(f"{m['role'].capitalize()}: {m.get('content') or ''}" for m in messages)


@torch.no_grad()
def choice_probability(model, tok, judge_prompts: list[list[dict]], batch_size: int = 32, autocast=contextlib.nullcontext) -> list[float]:
    """P("A") / (P("A") + P("B")) for the model's next token after each judging prompt (NaN when the prompt is too
    long for the context)."""
    a_id, b_id = tok.encode("A")[0], tok.encode("B")[0]
    device = model.head_weight().device
    all_ids = [encode_prompt(tok, c) for c in judge_prompts]
    keep = fits(all_ids, 1, model.cfg.max_seq_len)
    out = [float("nan")] * len(judge_prompts)
    for k in range(0, len(keep), batch_size):
        chunk = keep[k:k + batch_size]
        ids = [all_ids[i] for i in chunk]
        x = torch.full((len(ids), max(map(len, ids))), tok.pad_id, dtype=torch.long)
        for i, s in enumerate(ids):
            x[i, :len(s)] = torch.tensor(s)
        with autocast():
            logits = model(x.to(device)).logits.float()
        last = logits[torch.arange(len(ids)), torch.tensor([len(s) - 1 for s in ids])]
        for i, p in zip(chunk, torch.softmax(last[:, [a_id, b_id]], -1)[:, 0].tolist()):
            out[i] = p
    return out


@torch.no_grad()
def ai_preferences(model, tok, prompts: list[Prompt], principles: list[Principle], *, max_new_tokens: int = 64,
                   temperature: float = 1.0, batch_size: int = 32, seed: int = 0, autocast=contextlib.nullcontext) -> list[dict]:
    """Comparisons labelled by the model itself: two sampled answers per prompt, judged against a random principle
    in both orders. Prompts whose two answers are identical are skipped (a comparison needs different answers)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    convs = [p.messages for p in prompts]
    first = _sample(model, tok, convs, max_new_tokens, temperature, batch_size, autocast)
    second = _sample(model, tok, convs, max_new_tokens, temperature, batch_size, autocast)
    items = [(p, a, b, rng.choice(principles)) for p, a, b in zip(prompts, first, second) if a and b and a != b]
    judge = []
    for p, a, b, pr in items:
        transcript = render_transcript(p.messages)
        for x, y in ((a, b), (b, a)):
            judge.append([{"role": "user", "content": JUDGE.format(conversation=transcript, p=pr.text, a=x, b=y)}])
    probs = choice_probability(model, tok, judge, batch_size, autocast)
    out = []
    for n, (p, a, b, pr) in enumerate(items):
        p_a = 0.5 * (probs[2 * n] + (1 - probs[2 * n + 1]))  # A when a is first; B when a is second
        if p_a != p_a:  # NaN: a judging prompt did not fit in the context
            continue
        chosen, rejected = (a, b) if p_a >= 0.5 else (b, a)
        out.append({"prompt": p.messages, "chosen": chosen, "rejected": rejected, "p_chosen": max(p_a, 1 - p_a),
                    "principle": pr.text, **({"task": p.task} if p.task else {})})
    return out


def label_agreement(records: list[dict]) -> dict:
    """On comparisons of task prompts where exactly one answer passes the verifier: how often the AI label prefers it."""
    decided = [(check(r["task"], r["chosen"]), check(r["task"], r["rejected"])) for r in records if r.get("task")]
    informative = [c for c, rj in decided if c != rj]
    return {"pairs": len(records), "verifiable_pairs": len(informative),
            "agreement": sum(informative) / len(informative) if informative else None}
