"""Multiple-choice and exact-match generation tasks: item formats, generators, scoring.

Multiple choice (JSONL, one item a line, for your own tasks):
    {"question": "What is the capital of France?", "choices": ["Paris", "Lyon", "Nice", "Lille"], "answer": 0}
`answer` is the index of the right choice, or its letter ("A".."Z"), or its text. An optional "context" replaces
the default prompt `Question: {question}\nAnswer:`; choices are scored as " {choice}" after it.

Scoring follows lm-evaluation-harness: each choice's summed log-likelihood given the prompt; `acc` takes the
argmax, `acc_norm` the argmax per byte of the choice. `logp_correct` is the mean over items of log of the right
choice's probability renormalised over the choices: a smooth version of accuracy (the per-item pass probability
of the GPT-4 report's figure 2) used for downstream scaling predictions.

Generation (JSONL): {"prompt": "...", "answer": "..."}; the completion's first line, stripped, must equal the
answer. `arithmetic` generates such items (few-shot additions).
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class MCItem:
    context: str  # the prompt the choices continue
    choices: list[str]  # continuations, as scored (with their leading space)
    answer: int
    null_context: str | None = None  # for calibrated scoring: log p(choice | context) - log p(choice | null_context)


@dataclass
class GenItem:
    prompt: str
    answer: str


# ---- loading ---------------------------------------------------------------------------------------------------
def _answer_index(answer, choices: list[str], where: str) -> int:
    if isinstance(answer, bool):
        raise ValueError(f"{where}: answer must be an index, a letter or the text of a choice")
    if isinstance(answer, int):
        idx = answer
    elif isinstance(answer, str) and len(answer) == 1 and answer.isalpha() and answer.upper() not in choices:
        idx = ord(answer.upper()) - ord("A")
    elif isinstance(answer, str) and answer in choices:
        idx = choices.index(answer)
    else:
        raise ValueError(f"{where}: answer {answer!r} is not an index, a letter or one of the choices")
    if not 0 <= idx < len(choices):
        raise ValueError(f"{where}: answer index {idx} is outside the {len(choices)} choices")
    return idx


def _read_jsonl(path: str | Path) -> list[tuple[str, dict]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object")
            out.append((f"{path}:{n}", obj))
    if not out:
        raise ValueError(f"{path}: no items")
    return out


def load_mc_jsonl(path: str | Path) -> list[MCItem]:
    items = []
    for where, obj in _read_jsonl(path):
        missing = [k for k in ("choices", "answer") if k not in obj] + ([] if "question" in obj or "context" in obj else ["question"])
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)} (format: question, choices, answer)")
        choices = [str(c) for c in obj["choices"]]
        if len(choices) < 2:
            raise ValueError(f"{where}: needs at least two choices")
        context = obj.get("context") or f"Question: {obj['question']}\nAnswer:"
        items.append(MCItem(context, [" " + c for c in choices], _answer_index(obj["answer"], choices, where)))
    return items


def load_gen_jsonl(path: str | Path) -> list[GenItem]:
    items = []
    for where, obj in _read_jsonl(path):
        if "prompt" not in obj or "answer" not in obj:
            raise ValueError(f"{where}: needs \"prompt\" and \"answer\"")
        items.append(GenItem(str(obj["prompt"]), str(obj["answer"])))
    return items


# ---- generated tasks -------------------------------------------------------------------------------------------
def synthetic_mc(n: int = 20, seed: int = 0) -> list[MCItem]:
    """A small generated task for tests and smoke runs: "is X a colour / animal / number?" style yes-no-maybe
    questions whose right answer is always " yes" (at a random position among the choices)."""
    rng = random.Random(seed)
    things = ["red", "blue", "green", "cat", "dog", "horse", "seven", "nine", "three"]
    out = []
    for _ in range(n):
        t = rng.choice(things)
        choices = [" yes", " no", " maybe", " never"]
        rng.shuffle(choices)
        out.append(MCItem(f"Question: is {t} a word?\nAnswer:", choices, choices.index(" yes")))
    return out


_POS = {"n": "n", "v": "v", "adj": "adj", "adv": "adv"}
_WN_ENTRY = re.compile(r"^(?P<word>[^\n]+)\n\s*(?P<pos>n|v|adj|adv) (?:1: )?(?P<gloss>.+)", re.S)


def parse_definition(doc: str) -> tuple[str, str, str] | None:
    """(headword, part of speech, first gloss) of a WordNet dictd entry as the corpus stores it:
    'ablation\\nn 1: surgical removal of a body part or tissue [syn: ...]\\n2: ...'."""
    m = _WN_ENTRY.match(doc.replace("<|endoftext|>", ""))
    if not m:
        return None
    gloss = re.split(r"\s*(?:\[syn:|\[ant:|\n\s*\d+:|;\s*\")", m.group("gloss"))[0]
    gloss = " ".join(gloss.split()).rstrip(";").strip()
    word = m.group("word").strip()
    if not gloss or len(gloss) > 160 or not word or len(word) > 40:
        return None
    return word, m.group("pos"), gloss


def definition_mc(docs: list[str], n: int = 200, n_choices: int = 4, seed: int = 0) -> list[MCItem]:
    """Choose a word's dictionary definition among `n_choices` (the others: definitions of other words with the
    same part of speech), in the corpus's own format so a base model needs no instructions:
    context 'ablation\\nn 1:' and choices ' surgical removal of ...'."""
    entries = [e for e in (parse_definition(d) for d in docs) if e]
    by_pos: dict[str, list[tuple[str, str, str]]] = {}
    for e in entries:
        by_pos.setdefault(e[1], []).append(e)
    rng = random.Random(seed)
    pool = [e for e in entries if len(by_pos[e[1]]) >= n_choices]
    rng.shuffle(pool)
    items = []
    for word, pos, gloss in pool[:n]:
        others = [g for w, _, g in rng.sample(by_pos[pos], min(len(by_pos[pos]), 4 * n_choices)) if w != word and g != gloss]
        others = list(dict.fromkeys(others))[: n_choices - 1]
        if len(others) < n_choices - 1:
            continue
        choices = [gloss, *others]
        rng.shuffle(choices)
        items.append(MCItem(f"{word}\n{pos} 1:", [" " + c for c in choices], choices.index(gloss), null_context=f"\n{pos} 1:"))
    return items


def pos_mc(docs: list[str], n: int = 400, seed: int = 0) -> list[MCItem]:
    """Choose a word's part of speech (n, v, adj, adv) from the headword alone, in the corpus's format: context
    'ablation\n', choices 'n', 'v', 'adj', 'adv' (no space: the tag starts the line). Needs only morphology, so small models rise above chance
    early and smoothly: the downstream metric of the CPU scaling ladder."""
    entries = [e for e in (parse_definition(d) for d in docs) if e]
    random.Random(seed).shuffle(entries)
    tags = ["n", "v", "adj", "adv"]
    return [MCItem(f"{w}\n", list(tags), tags.index(p)) for w, p, _ in entries[:n]]


def continuation_mc(docs: list[str], n: int = 400, n_choices: int = 4, seed: int = 0) -> list[MCItem]:
    """Choose how a dictionary definition goes on (a HellaSwag-style completion): context 'word\npos 1: first
    half of the gloss', choices the true second half and the second halves of other glosses. Local syntax and
    word overlap already help, so accuracy rises from chance at small scale, smoothly."""
    halves = []
    for e in (parse_definition(d) for d in docs):
        if e and len(e[2].split()) >= 6:
            words = e[2].split()
            k = len(words) // 2
            halves.append((f"{e[0]}\n{e[1]} 1: " + " ".join(words[:k]), " " + " ".join(words[k:])))
    rng = random.Random(seed)
    rng.shuffle(halves)
    items = []
    for i, (ctx, true) in enumerate(halves[:n]):
        others = [t for _, t in rng.sample(halves, min(len(halves), 3 * n_choices)) if t != true]
        others = list(dict.fromkeys(others))[: n_choices - 1]
        if len(others) < n_choices - 1:
            continue
        choices = [true, *others]
        rng.shuffle(choices)
        items.append(MCItem(ctx, choices, choices.index(true)))
    return items


def arithmetic_items(n: int = 50, seed: int = 0, digits: int = 2, shots: int = 3) -> list[GenItem]:
    """Few-shot additions: '12 + 7 = 19\\n30 + 45 = 75\\n...\\n23 + 48 =' -> '71'."""
    rng = random.Random(seed)
    hi = 10 ** digits - 1

    def pair():
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        return f"{a} + {b} =", str(a + b)

    items = []
    for _ in range(n):
        shots_text = "".join(f"{q} {a}\n" for q, a in (pair() for _ in range(shots)))
        q, a = pair()
        items.append(GenItem(shots_text + q, a))
    return items


# ---- scoring ---------------------------------------------------------------------------------------------------
def _choice_stats(ll: np.ndarray, answer: int) -> tuple[int, float]:
    """(right choice has the top score, log of its probability renormalised over the choices)."""
    return int(np.argmax(ll) == answer), float(ll[answer] - np.logaddexp.reduce(ll))


def score_mc(lm, items: list[MCItem]) -> dict:
    """Accuracy (argmax of summed log-likelihood), per-byte accuracy, mean log p(correct) (the right choice's
    probability renormalised over the choices; `logp_norm`: the same with per-byte log-likelihoods as scores, which
    keeps choices of different lengths comparable), and, for items with a null context, the calibrated versions (`acc_pmi`, `logp_pmi`: score = log p(choice |
    context) - log p(choice | null context), which cancels how likely a choice is on its own)."""
    if not items:
        raise ValueError("multiple-choice task has no items")
    pairs = [(it.context, c) for it in items for c in it.choices]
    pmi_items = [it for it in items if it.null_context is not None]
    null_pairs = [(it.null_context, c) for it in pmi_items for c in it.choices]
    lls = lm.loglikelihood(pairs + null_pairs)
    cond, null = lls[: len(pairs)], lls[len(pairs):]
    sums = dict(acc=0.0, acc_norm=0.0, logp_correct=0.0, logp_norm=0.0, acc_pmi=0.0, logp_pmi=0.0)
    k = j = 0
    for it in items:
        ll = np.array(cond[k : k + len(it.choices)], dtype=float)
        k += len(it.choices)
        nbytes = np.array([max(1, len(c.encode())) for c in it.choices])
        hit, lp = _choice_stats(ll, it.answer)
        sums["acc"] += hit
        sums["logp_correct"] += lp
        hit, lp = _choice_stats(ll / nbytes, it.answer)
        sums["acc_norm"] += hit
        sums["logp_norm"] += lp
        if it.null_context is not None:
            base = np.array(null[j : j + len(it.choices)], dtype=float)
            j += len(it.choices)
            hit, lp = _choice_stats(ll - base, it.answer)
            sums["acc_pmi"] += hit
            sums["logp_pmi"] += lp
    n = len(items)
    out = {"n": n, **{key: v / n for key, v in sums.items() if "pmi" not in key}}
    if pmi_items:
        out.update({key: v / len(pmi_items) for key, v in sums.items() if "pmi" in key})
    out["chance"] = float(np.mean([1 / len(it.choices) for it in items]))
    out["acc_stderr"] = math.sqrt(max(out["acc"] * (1 - out["acc"]), 1e-12) / n)
    return out


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


def score_generation(lm, items: list[GenItem], max_tokens: int = 16) -> dict:
    """Exact match of the completion's first line (greedy decoding, stopped at a newline)."""
    if not items:
        raise ValueError("generation task has no items")
    outs = lm.generate([it.prompt for it in items], max_tokens=max_tokens, stop=["\n"])
    hits = [first_line(o) == it.answer.strip() for o, it in zip(outs, items)]
    return {"n": len(items), "exact_match": sum(hits) / len(items),
            "examples": [{"prompt": it.prompt[-60:], "expected": it.answer, "got": first_line(o)} for o, it in list(zip(outs, items))[:3]]}
