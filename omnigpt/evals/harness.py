"""Run named evaluation tasks against a model and collect one results dict (saved as JSON + a Markdown card).

Task names (`omnigpt eval TASK...`):
    val-loss          validation loss and bits per byte per source of --data CORPUS (its val split)
    dict-def          choose a word's definition among four, generated from the corpus's dictionary sources
                      (val split of --data, else the installed WordNet dictd file)
    dict-pos          choose a word's part of speech (n/v/adj/adv) from the headword (same sources)
    dict-cont         choose how a definition goes on among four (HellaSwag-style; same sources)
    mc:FILE.jsonl     your multiple-choice task ({"question", "choices", "answer"} per line)
    mc-synthetic      a small generated multiple-choice task (tests, smoke runs)
    arithmetic        few-shot two-digit additions, exact match
    gen:FILE.jsonl    your generation task ({"prompt", "answer"} per line), exact match of the first line
    humaneval         HumanEval pass@k, code run in a sandbox
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from omnigpt.evals import tasks as T

TASKS = ["val-loss", "dict-def", "dict-pos", "dict-cont", "mc:FILE", "mc-synthetic", "arithmetic", "gen:FILE", "humaneval",
         "vqa"]


@dataclass
class EvalSettings:
    data: str | None = None  # corpus directory (val-loss, dict-def)
    limit: int | None = None  # items per task (problems for humaneval)
    seed: int = 0
    n_samples: int = 1  # humaneval completions per problem
    ks: tuple[int, ...] = (1,)
    temperature: float | None = None
    max_val_tokens: int | None = 200_000  # per source, val-loss
    seq_len: int = 256
    timeout: float = 10.0  # humaneval, per program
    extra: dict = field(default_factory=dict)


def corpus_docs(corpus_dir: str, split: str = "val", prefix: str = "dict-") -> list[str]:
    """Decoded documents of the corpus sources whose name starts with `prefix`."""
    from omnigpt.data.shards import load_corpus_tokenizer, open_shards, read_manifest

    manifest = read_manifest(corpus_dir)
    names = [s for s, e in manifest["sources"].items() if s.startswith(prefix) and split in e]
    if not names:
        return []
    tok = load_corpus_tokenizer(corpus_dir)
    eot = int(tok.eot_id)
    return [tok.decode([int(t) for t in r.document(i) if int(t) != eot]) for r in open_shards(corpus_dir, split, sources=names).values()
            for i in range(len(r))]


def dictionary_items(s: EvalSettings, make=T.definition_mc) -> tuple[list[T.MCItem], str]:
    n = s.limit or 200
    if s.data:
        docs = corpus_docs(s.data, "val")
        items = make(docs, n=n, seed=s.seed)
        if items:
            return items, f"{s.data} (val split of its dict-* sources)"
    from omnigpt.data.sources import SOURCES

    src = SOURCES["dict-wn"]
    if not src.present():
        raise ValueError("dict-def needs --data CORPUS with a dict-* source, or WordNet installed (omnigpt data sources --install)")
    docs = []
    for i, d in enumerate(src.read()):
        if i % 20 == 0:  # a spread sample of the dictionary
            docs.append(d)
    return make(docs, n=n, seed=s.seed), "dict-wn (raw dictd; may overlap a model's training data)"


def run_task(lm, task: str, s: EvalSettings) -> dict:
    if task == "val-loss":
        if not s.data:
            raise ValueError("val-loss needs --data CORPUS (a directory with a val split)")
        from omnigpt.evals.valloss import api_val_bpb, corpus_val_loss

        if hasattr(lm, "model"):
            return corpus_val_loss(lm.model, s.data, seq_len=min(s.seq_len, lm.model.cfg.max_seq_len), max_tokens=s.max_val_tokens)
        return api_val_bpb(lm, s.data, max_docs=s.limit or 50)
    if task == "dict-def":
        items, origin = dictionary_items(s)
        return {**T.score_mc(lm, items), "source": origin}
    if task in ("dict-pos", "dict-cont"):
        items, origin = dictionary_items(s, T.pos_mc if task == "dict-pos" else T.continuation_mc)
        return {**T.score_mc(lm, items), "source": origin}
    if task == "mc-synthetic":
        return T.score_mc(lm, T.synthetic_mc(s.limit or 20, s.seed))
    if task.startswith("mc:"):
        return T.score_mc(lm, T.load_mc_jsonl(task[3:])[: s.limit])
    if task == "arithmetic":
        return T.score_generation(lm, T.arithmetic_items(s.limit or 50, s.seed), max_tokens=8)
    if task.startswith("gen:"):
        return T.score_generation(lm, T.load_gen_jsonl(task[4:])[: s.limit], max_tokens=64)
    if task == "humaneval":
        from omnigpt.evals.humaneval import run_humaneval

        return run_humaneval(lm, n_samples=s.n_samples, ks=s.ks, limit=s.limit, temperature=s.temperature,
                             timeout=s.timeout, seed=s.seed)
    if task == "vqa":  # ShapeBind questions with images: a vision checkpoint, or a server that has one
        from omnigpt.evals.lm import ApiLM
        from omnigpt.evals.vqa import api_vqa, eval_vqa, vqa_summary

        n_values, per_type = s.extra.get("vqa_n", (1, 2, 4)), s.limit or 20
        if getattr(lm, "vlm", None) is not None:
            return vqa_summary(eval_vqa(lm.vlm, lm.tok, n_values, per_type, seed=s.seed, log=lambda *a: None))
        if isinstance(lm, ApiLM):
            return vqa_summary(api_vqa(lm, n_values, per_type, s.extra.get("image_size", 128), seed=s.seed, log=lambda *a: None))
        raise ValueError("vqa needs a vision checkpoint (omnigpt vision train-vlm) or --api of a server serving one")
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")


def check_tasks(tasks: list[str]) -> None:
    for t in tasks:
        if t not in TASKS and not t.startswith(("mc:", "gen:")):
            raise ValueError(f"unknown task {t!r}; tasks: {', '.join(TASKS)}")


def run_eval(lm, tasks: list[str], s: EvalSettings, log=print) -> dict:
    check_tasks(tasks)
    res = {"model": lm.name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "settings": {k: v for k, v in vars(s).items() if k != "extra"}, "tasks": {}}
    for t in tasks:
        t0 = time.perf_counter()
        try:
            out = run_task(lm, t, s)
        except (ValueError, FileNotFoundError, RuntimeError) as e:  # one broken task does not lose the others
            out = {"error": str(e)}
            log(f"[eval] {t}: error: {e}")
        out["seconds"] = round(time.perf_counter() - t0, 2)
        res["tasks"][t] = out
        if "error" not in out:
            log(f"[eval] {t}: " + ", ".join(f"{k} {v:.4g}" for k, v in headline(t, out)) + f" ({out['seconds']:.1f}s)")
    return res


def headline(task: str, out: dict) -> list[tuple[str, float]]:
    """The few numbers of a task's result that go in the summary line and the report card."""
    keys = ["loss", "bpb", "acc", "acc_norm", "acc_pmi", "logp_correct", "logp_norm", "logp_pmi", "chance", "exact_match"] + [
        k for k in out if k.startswith("pass@") or "@N=" in k]
    return [(k, float(out[k])) for k in keys if k in out and isinstance(out[k], (int, float))]
