"""Weak scaling of the training path over the GPUs of one host (issue 8): torchrun + FSDP2, and expert parallelism.

    python benchmarks/multi_gpu_scaling.py --gpus 1,2,4,8 --out runs/multi-gpu      # an 8-GPU host
    python benchmarks/multi_gpu_scaling.py --smoke --gpus 1,2 --out /tmp/mg          # CPU, gloo, tiny models: checks the script

For each model and each GPU count N, one `torchrun --standalone --nproc-per-node N -m omnigpt.train` run with the same
per-GPU batch (weak scaling) on a generated corpus:
  - dense: the `small` preset under FSDP2;
  - moe:   the `small` width with the seeds' GPT-4 routing (16 experts, top-2) in every layer, experts split over
           the GPUs (`--expert-parallel`) and the rest under FSDP2.
Throughput and MFU are the median of the run's logged intervals after the first (compile and warm-up); efficiency
= tokens/s at N / (N x tokens/s at 1). Then, for the largest N, a 1-GPU run with --grad-accum N (the same global
batch, the same data) and the loss curves of both in one PNG, with their largest gap.

Writes OUT/scaling.json, OUT/scaling.md (the table) and OUT/loss_1_vs_N.png. Each run's own folder keeps its
metrics.jsonl and log. Not covered: the largest model that fits in 8 x 141 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {  # name -> (preset and model overrides, extra trainer flags when N > 1)
    "dense": (["--preset", "small"], []),
    "moe": (["--preset", "small-moe", "--model", "n_experts=16", "--model", "top_k=2"], ["--expert-parallel"]),
}
SMOKE_MODELS = {
    "dense": (["--preset", "tiny"], []),
    "moe": (["--preset", "tiny-moe", "--model", "n_experts=4"], ["--expert-parallel"]),
}


def corpus(path: Path, vocab: int, docs: int) -> Path:
    if not (path / "manifest.json").is_file():
        from omnigpt.train.synthetic import write_synthetic_corpus

        write_synthetic_corpus(path, {"markov": docs}, vocab=vocab, val_docs=16)
    return path


def train(n: int, out: Path, data: Path, model_args: list[str], a, extra: list[str]) -> dict:
    """One torchrun run; returns its throughput figures and loss curve."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m", "omnigpt.train",
           "--data", str(data), "--out", str(out), *model_args, "--steps", str(a.steps), "--batch-size", str(a.batch_size),
           "--seq-len", str(a.seq_len), "--log-every", str(a.log_every), "--val-every", "0", "--val-batches", "1",
           "--no-plot", "--no-doc-mask", "--device", a.device, *(["--compile"] if a.compile else []), *extra]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}).returncode
    if rc:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {rc}); see {out / 'log.txt'}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in recs if "tok_per_s" in r]
    steady = logs[1:] or logs  # the first interval holds compilation and warm-up
    mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
    return {"gpus": n, "tok_per_s": statistics.median(r["tok_per_s"] for r in steady),
            "mfu": statistics.median(mfu) if mfu else None, "wall_s": round(time.perf_counter() - t0, 1),
            "loss": [(r["step"], r["loss"]) for r in logs]}


def fmt_mfu(mfu: float | None) -> str:
    return "-" if mfu is None else f"{mfu:.1%}"  # no peak FLOPs known on CPU


def plot(a_run: dict, b_run: dict, label_a: str, label_b: str, path: Path, title: str) -> float:
    """Both loss curves in one PNG; returns the largest gap between them at shared steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run, label in ((a_run, label_a), (b_run, label_b)):
        ax.plot(*zip(*run["loss"]), label=label)
    ax.set(xlabel="step", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    b = dict(b_run["loss"])
    return max((abs(loss - b[s]) for s, loss in a_run["loss"] if s in b), default=float("nan"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", default="1,2,4,8")
    ap.add_argument("--models", default="dense,moe")
    ap.add_argument("--out", default=str(ROOT / "runs" / "multi-gpu"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16, help="rows per GPU (weak scaling)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU over gloo")
    args = ap.parse_args()
    args.device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        args.batch_size, args.seq_len, args.log_every, args.compile = 4, 64, 2, False
        args.steps = min(args.steps, 8)
    models = SMOKE_MODELS if args.smoke else MODELS
    gpus = [int(g) for g in args.gpus.split(",")]
    if gpus[0] != 1:
        raise SystemExit(f"--gpus {args.gpus}: start at 1 (efficiency is measured against one GPU)")
    out = Path(args.out)
    data = corpus(out / "corpus", vocab=512 if args.smoke else 32768, docs=400 if args.smoke else 20_000)

    rows, curves = [], {}
    for name in args.models.split(","):
        model_args, parallel = models[name]
        base = None
        for n in gpus:
            r = train(n, out / f"{name}-{n}gpu", data, model_args, args, parallel if n > 1 else [])
            base = base or r["tok_per_s"] / r["gpus"]
            r.update(model=name, efficiency=r["tok_per_s"] / (n * base))
            rows.append(r)
            print(f"{name:6s} {n} GPU(s): {r['tok_per_s']:>12,.0f} tok/s  MFU {fmt_mfu(r['mfu'])}  weak-scaling efficiency "
                  f"{r['efficiency']:.1%}  ({r['wall_s']:.0f}s)", flush=True)
        n = max(gpus)
        if n > 1:  # the same global batch on one GPU, accumulated: the loss curves must agree
            one = train(1, out / f"{name}-1gpu-accum{n}", data, model_args, args, ["--grad-accum", str(n)])
            many = next(r for r in rows if r["model"] == name and r["gpus"] == n)
            gap = plot(one, many, f"1 GPU, grad-accum {n}", f"{n} GPUs", out / f"loss_1_vs_{n}_{name}.png",
                       f"{name}: same global batch on 1 and {n} GPUs")
            curves[name] = {"max_abs_loss_gap": gap, "png": str(out / f"loss_1_vs_{n}_{name}.png")}
            print(f"{name}: loss curves of 1 GPU (accumulating) and {n} GPUs differ by at most {gap:.4f}", flush=True)

    table = ["| model | GPUs | tokens/s | MFU | weak-scaling efficiency |", "|---|---:|---:|---:|---:|"]
    table += [f"| {r['model']} | {r['gpus']} | {r['tok_per_s']:,.0f} | {fmt_mfu(r['mfu'])} | {r['efficiency']:.1%} |" for r in rows]
    (out / "scaling.md").write_text("\n".join(table) + "\n")
    (out / "scaling.json").write_text(json.dumps({"runs": rows, "loss_agreement": curves, "args": vars(args)}, indent=1))
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
