"""The GPU scaling ladder: predict a run's final validation loss from runs with <= 1/1000 of its compute, then train
it and report the error. Two resumable stages, each well under 9 minutes on one H100/H200:

    python benchmarks/scaling_ladder.py --stage small    # the small runs + the prediction (prediction.json)
    python benchmarks/scaling_ladder.py --stage target   # trains the target, adds outcome + error, plots
    python benchmarks/scaling_ladder.py --stage all      # both, one after the other

Progress lives in OUT/runs.jsonl (one line per finished run): a stage that is cut off re-runs only what is missing.
The recipe is the CPU ladder's (benchmarks/scaling_cpu_ladder.py: width dial, depth 2, 2 heads, vocab 512, seq
128, 20 tokens per parameter, lr 1e-2 * 64/width) with a target 1000x the largest small run instead of 100x.

Corpus: --data, default runs/corpora/dict512 (WordNet + GCIDE, byte-level BPE of 512 ids, 27.8M tokens, 55 MB:
small enough to carry to the GPU machine), built with
    omnigpt data build --sources dict-wn,dict-gcide --tokenizer train:512 --out runs/corpora/dict512
The target (width 192, ~1M parameters) trains on 19.7M tokens: 0.7 epochs of it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scaling_cpu_ladder import RECIPE  # noqa: E402  (one recipe for both ladders)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=("small", "target", "all"), default="all")
    ap.add_argument("--data", default=str(ROOT / "runs" / "corpora" / "dict512"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "scaling-gpu"))
    ap.add_argument("--values", default="8,12,16,20,24")  # the largest, 24, is 1/1070 of the target's compute
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--target", default="192")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    from omnigpt.data.shards import read_manifest
    from omnigpt.scaling.ladder import LadderSpec, corpus_vocab, plan_run

    train_tokens = read_manifest(args.data)["totals"]["train"]["tokens"]
    spec = LadderSpec(tokens_per_param=20, lr=0.01, lr_width_power=1.0, n_heads=2)
    t = plan_run(int(args.target), spec, corpus_vocab(args.data))
    print(f"target {t.name}: N={t.params:,} D={t.tokens:,} C={t.flops:.3g}; the corpus has {train_tokens:,} training "
          f"tokens ({t.tokens / train_tokens:.2f} epochs)", flush=True)
    base = [sys.executable, "-m", "omnigpt.cli", "scaling", "predict", "--data", args.data, "--out", args.out,
            "--values", args.values, "--seeds", args.seeds, "--target", args.target, "--device", args.device,
            "--max-fraction", "0.001", "--downstream-metric", "mc_acc", *RECIPE]
    stages = {"small": [base + ["--no-train"]], "target": [base], "all": [base + ["--no-train"], base]}[args.stage]
    t0 = time.time()
    for cmd in stages:
        print("+", " ".join(cmd), flush=True)
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        if rc:
            return rc
    pred = json.loads((Path(args.out) / "prediction.json").read_text())
    pred.setdefault("stage_seconds", {})[args.stage] = round(time.time() - t0, 1)
    (Path(args.out) / "prediction.json").write_text(json.dumps(pred, indent=2) + "\n")
    for k, p in pred["predictions"].items():
        if p:
            extra = f"  actual {p['actual']:.4f}  error {100 * p['error']:+.2f}%" if p.get("actual") is not None else ""
            print(f"  {k:16s} predicted {p['predicted']:.4f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
