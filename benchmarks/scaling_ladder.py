"""The GPU scaling ladder: predict a run's final validation loss from runs with <= 1/1000 of its compute, then train
it (several seeds) and report the error. One call of about 8 minutes on one H100/H200:

    python benchmarks/scaling_ladder.py                    # fit runs, the prediction (on disk first), then the target
    python benchmarks/scaling_ladder.py --stage small      # only the fit runs and the prediction
    python benchmarks/scaling_ladder.py --family ladder    # the old family (2 heads of width/2), fitted on FLOPs

These models are tiny, so a run costs its optimizer steps (~8 ms each, bound by kernel launches, not by the GPU):
--jobs processes share the one GPU, each training its own share of the runs into OUT/jobs/J, and the finished runs
are merged into OUT/runs.jsonl. A cut-off call re-runs only what is missing.

Families (benchmarks/scaling_cpu_ladder.py FAMILIES, with the GPU's 1/1000 rule):
- fixed-attention (default): 2 heads x 16 dims of attention at every width, fitted against 6ND. Fit widths 8-16 x
  20 seeds (width 16: 4.6e10 FLOPs, 1/1306 of the target); target width 192 (0.70M matmul parameters, 14.0M tokens
  = 0.88 epochs of wn320, 27k steps) with 4 seeds. Width 20 would need a target of width 208, 1.01 epochs.
- ladder: widths 8-20 x 3 seeds, target width 160, one seed (the committed run of 2026-11-22).

Corpus: --data, default runs/corpora/wn320 (WordNet, byte-level BPE of 320 ids), built when missing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scaling_cpu_ladder import FAMILIES, PREDICT, RECIPE, VOCAB, ensure_corpus, print_table  # noqa: E402  (one recipe for both ladders)
from omnigpt.scaling.ladder import append_run, read_runs  # noqa: E402

GPU_FAMILIES = {  # fit values, fit seeds, target, target seeds (the flags are FAMILIES')
    "fixed-attention": ("8,12,16", ",".join(map(str, range(20))), "192", "0,1,2,3"),
    "ladder": ("8,12,16,20", "0,1,2", "160", "0"),
}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "omnigpt.cli", "scaling", *args]


def train_in_parallel(jobs: list[tuple[str, str]], common: list[str], out: Path) -> None:
    """Run one `scaling sweep` per (values, seeds) job at once, each in OUT/jobs/J, then merge their finished runs
    (records and folders) into OUT: the same runs.jsonl a single sequential sweep would have written."""
    done = {r["name"] for r in read_runs(out / "runs.jsonl")}
    procs = []
    for j, (values, seeds) in enumerate(jobs):
        cmd = cli("sweep", "--values", values, "--seeds", seeds, "--out", str(out / "jobs" / str(j)), *common)
        print("+", " ".join(cmd), flush=True)
        with open(out / "jobs" / f"{j}.log", "a") as log:  # the child keeps its own copy of the file
            procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    failed = [j for j, p in enumerate(procs) if p.wait()]
    for j in range(len(jobs)):
        for r in read_runs(out / "jobs" / str(j) / "runs.jsonl"):
            if r["name"] not in done:
                append_run(out / "runs.jsonl", r)
                done.add(r["name"])
                src = out / "jobs" / str(j) / r["name"]
                if src.is_dir() and not (out / r["name"]).exists():
                    shutil.move(str(src), str(out / r["name"]))
    if failed:
        raise SystemExit(f"job(s) {failed} failed: see {out / 'jobs'}/J.log")


def split(seeds: str, parts: int) -> list[str]:
    s = seeds.split(",")
    return [",".join(s[i::parts]) for i in range(min(parts, len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=("small", "all"), default="all")
    ap.add_argument("--family", choices=list(GPU_FAMILIES), default="fixed-attention")
    ap.add_argument("--data", default=str(ROOT / "runs" / "corpora" / f"wn{VOCAB}"))
    ap.add_argument("--out", help="default runs/scaling-gpu-fixattn (fixed-attention) or runs/scaling-gpu (ladder)")
    ap.add_argument("--values", help="fit widths (default: the family's)")
    ap.add_argument("--seeds", help="seeds of every fit width (default: the family's)")
    ap.add_argument("--target", help="target width (default: the family's)")
    ap.add_argument("--target-seeds", help="seeds of the target (default: the family's); the error is the mean's")
    ap.add_argument("--jobs", type=int, default=4, help="training processes sharing the device")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-fraction", type=float, default=0.001, help="the budget rule (a looser one for a quick check)")
    args = ap.parse_args()

    from omnigpt.data.shards import read_manifest
    from omnigpt.scaling.ladder import LadderSpec, corpus_vocab, plan_run

    values, seeds, target, target_seeds = (getattr(args, k) or d for k, d in
                                           zip(("values", "seeds", "target", "target_seeds"), GPU_FAMILIES[args.family]))
    out = Path(args.out or ROOT / "runs" / ("scaling-gpu-fixattn" if args.family == "fixed-attention" else "scaling-gpu"))
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    data = ensure_corpus(Path(args.data))
    flags = FAMILIES[args.family][0]
    spec = LadderSpec(fixed_attention=True, n_heads=2, head_dim=16) if args.family == "fixed-attention" else LadderSpec()
    t = plan_run(int(target), spec, corpus_vocab(data))
    train_tokens = read_manifest(data)["totals"]["train"]["tokens"]
    print(f"target {t.name}: N={t.params:,} D={t.tokens:,} C={t.flops:.3g}; the corpus has {train_tokens:,} training "
          f"tokens ({t.tokens / train_tokens:.2f} epochs); {t.steps:,} steps of {t.batch_size} x {t.cfg.max_seq_len}", flush=True)
    common = ["--data", str(data), "--device", args.device, "--threads", "1", *RECIPE, *flags]
    predict = cli("predict", "--values", values, "--seeds", seeds, "--target", target, "--max-fraction", str(args.max_fraction),
                  "--out", str(out), *PREDICT, *common)
    biggest = max(plan_run(int(v), spec, corpus_vocab(data)).flops for v in values.split(","))
    if biggest > args.max_fraction * t.flops:  # `predict` would refuse too, but only after the fit runs had trained
        raise SystemExit(f"a fit run would use 1/{t.flops / biggest:.0f} of the target's compute; "
                         f"the limit is 1/{1 / args.max_fraction:.0f}")
    t0 = time.time()
    train_in_parallel([(values, s) for s in split(seeds, args.jobs)], common, out)
    rc = subprocess.run(predict + ["--no-train"], cwd=ROOT).returncode
    if rc or args.stage == "small":
        return rc
    stamp = {"small_seconds": round(time.time() - t0, 1)}
    t1 = time.time()
    train_in_parallel([(target, s) for s in split(target_seeds, args.jobs)], common, out)
    rc = subprocess.run(predict, cwd=ROOT).returncode  # target seed 0 is trained: this scores and plots it
    if rc:
        return rc
    doc = json.loads((out / "prediction.json").read_text())
    runs = {r["name"]: r for r in read_runs(out / "runs.jsonl")}
    names = [plan_run(int(target), spec, corpus_vocab(data), seed=int(s)).name for s in target_seeds.split(",")]
    losses = [runs[n]["val_loss"] for n in names]
    pred = doc["predictions"]["val_loss"]["predicted"]
    mean = statistics.fmean(losses)
    doc["target_seeds"] = {"names": names, "val_loss": losses, "mean": mean,
                           "sd": statistics.stdev(losses) if len(losses) > 1 else None, "error_of_mean": pred / mean - 1}
    doc["stage_seconds"] = {**stamp, "target_seconds": round(time.time() - t1, 1)}
    (out / "prediction.json").write_text(json.dumps(doc, indent=2) + "\n")
    print_table(doc)
    print(f"  target seeds {', '.join(f'{x:.4f}' for x in losses)}: mean {mean:.4f}; "
          f"error of the mean {100 * (pred / mean - 1):+.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
