"""A family of models along one size dial, each trained for a fixed or compute-optimal token budget.

The family (`LadderSpec`): one dial sets the size and everything else derives from it.
    dial "depth": n_layers = v, d_model = aspect * v      (DESIGN.md's convention; coarse at small sizes)
    dial "width": d_model = v, n_layers = depth            (fine steps: what a CPU ladder needs)
    heads: a fixed count (n_heads), or d_model / head_dim; or, with fixed_attention, n_heads x head_dim at every size; full multi-head; d_ff = 8/3 d_model rounded to 8; untied head.
N is the config's matmul parameter count (`param_counts()["active_matmul"]`: what 6N counts), D the training
tokens, C = flops_per_token(seq_len) * D (omnigpt's FLOPs convention, omnigpt/config.py).

The recipe, identical at every size so that the runs are one family: D = tokens_per_param * N (or a fixed D);
a fixed batch of `batch_size` rows (default 4 x 128 = 512 tokens) at every size, the steps taking the rest (D / 512),
or steps_ref * (D / 1M)^steps_power steps with the batch taking the rest when batch_size is None or 0; AdamW
(beta2 0.95) with lr = lr * (lr_ref_width / d_model)^lr_width_power (5e-3 * 64 / width); cosine schedule with 5%
warmup to 10% of the peak. Why a small fixed batch: the old default (300 steps at every size, the batch growing
with D) left the large runs step-limited (width 48: 0.11 nats better with twice the steps at the same tokens) while
the small runs trained at 3-10 rows; at 4 rows every size from width 16 up is within noise of its loss at 2 rows,
so the loss measures N and D, not how the tokens were split into steps. The lr is the optimum of a sweep
(x0.25-x2) at widths 8-48. Both were chosen on backtests, not on the target (benchmarks/RESULTS.md).

Each run trains through `omnigpt.train.trainer.train` (its public entry point; validation off there), then its
final checkpoint is scored here on a fixed slice of the corpus's val split (same tokens for every run) and,
when the corpus has dictionary sources, on a multiple-choice task (dict-cont by default). One JSON line per run in
`runs.jsonl`; a sweep skips runs already recorded there, so it resumes after an interruption.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from omnigpt.config import ModelConfig


@dataclass
class LadderSpec:
    dial: str = "width"  # "width" or "depth"
    depth: int = 2  # n_layers when dial == "width"
    aspect: int = 32  # d_model per layer when dial == "depth"
    head_dim: int = 16  # heads = d_model / head_dim ...
    n_heads: int | None = 2  # ... unless the head count is fixed (head_dim = d_model / n_heads): lets widths step by 4
    fixed_attention: bool = False  # n_heads x head_dim attention at every size, whatever d_model (the dial moves the rest)
    seq_len: int = 128
    tokens_per_param: float | None = 20.0  # compute-optimal style budget D = r * N ...
    tokens: int | None = None  # ... or a fixed budget for every run
    lr: float = 5e-3
    lr_ref_width: int = 64
    lr_width_power: float = 1.0
    batch_size: int | None = 4  # rows per optimizer step at every size, the steps taking the rest (D / (4 * seq_len)) ...
    steps_ref: int = 300  # ... or, with batch_size None/0: optimizer steps of a run of 1M tokens ...
    steps_power: float = 0.0  # ... growing as D^power (the batch takes the rest: D^(1 - power))
    max_batch: int = 1024
    warmup_frac: float = 0.05
    min_lr_ratio: float = 0.1  # the cosine schedule ends at this fraction of the peak lr
    weight_decay: float = 0.1
    beta2: float = 0.95  # AdamW second-moment decay
    seed: int = 0
    val_tokens: int = 60_000  # per source, the same slice for every run
    downstream: str = "dict-cont"  # multiple-choice task scored on every run: dict-cont, dict-pos, dict-def or ""
    mc_items: int = 600
    device: str | None = None

    def validate(self) -> None:
        if self.dial not in ("width", "depth"):
            raise ValueError(f"dial must be 'width' or 'depth', got {self.dial!r}")
        if (self.tokens_per_param is None) == (self.tokens is None):
            raise ValueError("give exactly one of tokens_per_param and tokens")


def family_config(value: int, spec: LadderSpec, vocab_size: int) -> ModelConfig:
    if spec.dial == "depth":
        n_layers, d_model = value, spec.aspect * value
    else:
        n_layers, d_model = spec.depth, value
    d_ff = max(8, int(round(8 * d_model / 3 / 8)) * 8)
    if spec.fixed_attention:  # the same context machinery at every size: q/k/v of n_heads x head_dim, projected from d_model
        if not spec.n_heads:
            raise ValueError("fixed_attention needs a fixed head count (n_heads)")
        return ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=spec.n_heads, n_kv_heads=spec.n_heads,
                           head_dim=spec.head_dim, d_ff=d_ff, max_seq_len=spec.seq_len)
    heads = spec.n_heads or max(1, d_model // spec.head_dim)
    if d_model % heads or (d_model // heads) % 2:
        raise ValueError(f"d_model={d_model} does not split into {heads} heads of an even size")
    return ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=heads, n_kv_heads=heads,
                       d_ff=d_ff, max_seq_len=spec.seq_len)


@dataclass
class RunPlan:
    name: str
    value: int
    cfg: ModelConfig
    params: int  # N: matmul parameters
    params_total: int
    tokens: int  # D actually trained (steps * batch * seq_len)
    flops: float  # C
    steps: int
    batch_size: int
    lr: float
    warmup: int
    seed: int = 0


def plan_run(value: int, spec: LadderSpec, vocab_size: int, tokens_per_param: float | None = None, seed: int | None = None) -> RunPlan:
    cfg = family_config(value, spec, vocab_size)
    pc = cfg.param_counts()
    N = pc["active_matmul"]
    ratio = tokens_per_param if tokens_per_param is not None else spec.tokens_per_param
    want = spec.tokens if ratio is None else ratio * N
    T = spec.seq_len
    if spec.batch_size:
        batch = spec.batch_size
    else:
        steps_want = spec.steps_ref * (want / 1e6) ** spec.steps_power
        batch = max(1, min(spec.max_batch, int(round(want / (T * steps_want)))))
    steps = max(1, int(round(want / (batch * T))))
    D = steps * batch * T
    lr = spec.lr * (spec.lr_ref_width / cfg.d_model) ** spec.lr_width_power
    tag = f"r{ratio:g}" if ratio is not None else f"D{spec.tokens}"
    seed = spec.seed if seed is None else seed
    return RunPlan(name=f"{spec.dial}{value}-{tag}" + (f"-s{seed}" if seed != spec.seed else ""), value=value, cfg=cfg,
                   params=N, params_total=pc["total"], tokens=D, flops=float(cfg.flops_per_token(T) * D), steps=steps,
                   batch_size=batch, lr=lr, warmup=max(1, int(round(spec.warmup_frac * steps))), seed=seed)


# ---- running ---------------------------------------------------------------------------------------------------
def read_runs(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_run(path: str | Path, record: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def corpus_vocab(corpus_dir: str | Path) -> int:
    from omnigpt.data.shards import read_manifest

    tok = read_manifest(corpus_dir)["tokenizer"]
    need = max(int(tok["vocab_size"]), int(tok["eot_id"]) + 1)
    return int(math.ceil(need / 64) * 64)


def train_data(corpus_dir: str | Path):
    """Every training source of the corpus, in natural proportions; no validation inside the trainer."""
    from omnigpt.data.packing import ShardSource
    from omnigpt.data.shards import open_shards
    from omnigpt.train.trainer import TrainData

    train = {n: r for n, r in open_shards(corpus_dir, "train").items() if r.num_tokens > 0}
    if not train:
        raise ValueError(f"{corpus_dir}: no training tokens")
    return TrainData(train=[ShardSource(n, r) for n, r in train.items()], val=[]), [float(r.num_tokens) for r in train.values()]


def downstream_items(corpus_dir: str | Path, task: str, n: int, seed: int = 0):
    """Multiple-choice items of `task` (dict-cont, dict-pos or dict-def) from the corpus's val split; None when the task is
    off or the corpus has no dictionary source."""
    if not task or n <= 0:
        return None
    from omnigpt.evals.harness import corpus_docs
    from omnigpt.evals.tasks import continuation_mc, definition_mc, pos_mc

    make = {"dict-cont": continuation_mc, "dict-pos": pos_mc, "dict-def": definition_mc}.get(task)
    if make is None:
        raise ValueError(f"unknown downstream task {task!r}; choose dict-cont, dict-pos or dict-def")
    items = make(corpus_docs(str(corpus_dir), "val"), n=n, seed=seed)
    return items or None


def evaluate_run(ckpt_dir: Path, corpus_dir: str | Path, spec: LadderSpec, mc_items=None) -> dict:
    from omnigpt.evals.lm import LocalLM
    from omnigpt.evals.tasks import score_mc
    from omnigpt.evals.valloss import corpus_val_loss
    from omnigpt.model.weights import load_model

    device = spec.device or "cpu"
    model = load_model(ckpt_dir, device=device)
    val = corpus_val_loss(model, corpus_dir, seq_len=spec.seq_len, max_tokens=spec.val_tokens)
    out = {"val_loss": val["loss"], "val_bpb": val["bpb"], "val_by_source": {k: v["loss"] for k, v in val["sources"].items()}}
    if mc_items:
        from omnigpt.data.shards import load_corpus_tokenizer

        mc = score_mc(LocalLM(model, load_corpus_tokenizer(corpus_dir), batch_size=32), mc_items)
        out.update({"mc_" + k: v for k, v in mc.items() if k in ("acc", "acc_norm", "logp_correct", "logp_norm", "acc_pmi", "logp_pmi", "n",
                                                              "chance", "acc_stderr")})
        out["mc_prior"] = answer_prior(mc_items)
        # The GPT-4 report's "mean log pass rate" for a completion task: log p(right answer | context), summed over
        # its tokens (the probability that sampling at temperature 1 writes exactly the right answer), item mean.
        lm = LocalLM(model, load_corpus_tokenizer(corpus_dir), batch_size=32)
        out["mc_logp_pass"] = float(sum(lm.loglikelihood([(it.context, it.choices[it.answer]) for it in mc_items])) / len(mc_items))
    return out


def answer_prior(items) -> float:
    """The accuracy a model reaches without reading the question: chance, or always giving the most common right
    answer when the choices repeat across items (dict-pos: 'n', about 3 items in 4)."""
    from collections import Counter

    top = Counter(it.choices[it.answer] for it in items).most_common(1)[0][1] / len(items)
    return max(top, sum(1 / len(it.choices) for it in items) / len(items))


def run_one(plan: RunPlan, spec: LadderSpec, corpus_dir: str | Path, out_dir: str | Path, mc_items=None, log=print) -> dict:
    """Train one run (fresh) and return its record; a diverged run is recorded with its reason."""
    from omnigpt.scaling.fit import curve_diverged
    from omnigpt.train import checkpoint as ckpt
    from omnigpt.train.trainer import TrainConfig, train

    run_dir = Path(out_dir) / plan.name
    if ckpt.latest_checkpoint(run_dir / "checkpoints") is not None:
        import shutil

        shutil.rmtree(run_dir)  # a half-finished run from an interrupted sweep: start it again
    data, weights = train_data(corpus_dir)
    tc = TrainConfig(out_dir=str(run_dir), steps=plan.steps, batch_size=plan.batch_size, seq_len=spec.seq_len, lr=plan.lr,
                     weight_decay=spec.weight_decay, beta2=spec.beta2, warmup_steps=plan.warmup, schedule="cosine", min_lr_ratio=spec.min_lr_ratio,
                     seed=plan.seed, weights=weights, log_every=max(1, plan.steps // 20), val_every=0, ckpt_every=0,
                     keep_checkpoints=1, plot=False, device=spec.device)
    record = {"name": plan.name, "dial": spec.dial, "value": plan.value, "seed": plan.seed, "params": plan.params, "params_total": plan.params_total,
              "tokens": plan.tokens, "flops": plan.flops, "steps": plan.steps, "batch_size": plan.batch_size, "seq_len": spec.seq_len,
              "lr": plan.lr, "model": plan.cfg.to_dict(), "spec": asdict(spec), "recipe": recipe_key(spec, corpus_dir)}
    log(f"[scaling] {plan.name}: N={plan.params:,} D={plan.tokens:,} C={plan.flops:.3g} ({plan.steps} steps x {plan.batch_size} x {spec.seq_len})")
    t0 = time.perf_counter()
    try:
        train(plan.cfg, tc, data)
    except FloatingPointError as e:
        return {**record, "val_loss": float("nan"), "diverged": str(e), "seconds": time.perf_counter() - t0}
    seconds = time.perf_counter() - t0
    if (Path(corpus_dir) / "tokenizer").is_dir() and not (run_dir / "tokenizer").exists():
        import shutil

        shutil.copytree(Path(corpus_dir) / "tokenizer", run_dir / "tokenizer")  # `omnigpt eval --model RUN` finds it
    losses = [r["loss"] for r in read_runs(run_dir / "metrics.jsonl") if "loss" in r]
    record.update({"train_loss": losses[-1] if losses else None, "seconds": seconds,
                   "tok_per_s": plan.tokens / seconds, "diverged": curve_diverged(losses)})
    record.update(evaluate_run(ckpt.latest_checkpoint(run_dir / "checkpoints"), corpus_dir, spec, mc_items))
    log(f"[scaling] {plan.name}: val loss {record['val_loss']:.4f}" + (f", {spec.downstream} acc {record['mc_acc']:.3f}" if "mc_acc" in record else "")
        + f" in {seconds:.0f}s ({record['tok_per_s']:.0f} tok/s)")
    return record


def recipe_key(spec: LadderSpec, corpus_dir: str | Path) -> dict:
    """What makes two runs of the same name comparable: the recipe (not the seed or the device) and the corpus's
    tokenizer."""
    from omnigpt.data.shards import read_manifest

    key = {k: v for k, v in asdict(spec).items() if k not in ("seed", "device")}
    if not spec.fixed_attention:
        del key["fixed_attention"]  # added later: runs recorded before it still match their recipe
    key["tokenizer_sha256"] = read_manifest(corpus_dir)["tokenizer"].get("sha256")
    return key


def check_same_recipe(records: list[dict], spec: LadderSpec, corpus_dir: str | Path, where) -> None:
    """Raise ValueError when OUT/runs.jsonl holds runs of another recipe or corpus: a resumed sweep would otherwise
    mix them into one fit (runs are matched by name, which the recipe does not change)."""
    want = recipe_key(spec, corpus_dir)
    for r in records:
        have = r.get("recipe")
        if have != want:
            diff = sorted(k for k in set(want) | set(have or {}) if (have or {}).get(k) != want.get(k))
            raise ValueError(f"{where} holds run {r['name']} of another recipe or corpus (differs in: {', '.join(diff)}); "
                             "choose another --out")


def sweep(values: list[int], spec: LadderSpec, corpus_dir: str | Path, out_dir: str | Path, *,
          ratios: list[float] | None = None, seeds: list[int] | None = None, log=print) -> list[dict]:
    """Train every (value, tokens-per-param ratio, seed) not yet in OUT/runs.jsonl; return the records of these
    runs. Several seeds give several points at the same compute: the fit then averages out seed noise."""
    spec.validate()
    out = Path(out_dir)
    runs_file = out / "runs.jsonl"
    vocab = corpus_vocab(corpus_dir)
    plans = [plan_run(v, spec, vocab, r, sd) for v in values for r in (ratios or [None]) for sd in (seeds or [spec.seed])]
    done = {r["name"] for r in read_runs(runs_file)}
    check_same_recipe(read_runs(runs_file), spec, corpus_dir, runs_file)
    todo = [p for p in plans if p.name not in done]
    mc_items = downstream_items(corpus_dir, spec.downstream, spec.mc_items, spec.seed) if todo else None
    for p in sorted(todo, key=lambda p: p.flops):
        append_run(runs_file, run_one(p, spec, corpus_dir, out, mc_items, log))
    names = {p.name for p in plans}
    return [r for r in read_runs(runs_file) if r["name"] in names]
