"""The GPU scaling ladder: predict a run's final validation loss from runs with <= 1/1000 of its compute, then train
it and report the error. Two resumable stages, each under 9 minutes on one H100/H200:

    python benchmarks/scaling_ladder.py --stage small    # the small runs + the prediction (prediction.json)
    python benchmarks/scaling_ladder.py --stage target   # trains the target, adds outcome + error, plots
    python benchmarks/scaling_ladder.py --stage all      # both, one after the other

Progress lives in OUT/runs.jsonl (one line per finished run): a stage that is cut off re-runs only what is missing.
The recipe is the CPU ladder's (benchmarks/scaling_cpu_ladder.py RECIPE: width dial, depth 2, 2 heads, seq 128, 20
tokens per parameter, 4 x 128 tokens per step, lr 5e-3 * 64/width, a byte-level BPE of 320 ids) with a target
1000x the largest small run instead of 100x. These models are tiny, so a run costs its optimizer steps (~10 ms
each on one GPU): small stage 5 widths x 3 seeds = 7.1k steps (~1.5 min with the evaluations); target width 192
(0.95M matmul parameters, 18.9M tokens) = 37.0k steps (~6-7 min).

Corpus: --data, default runs/corpora/dict320 (WordNet + GCIDE, byte-level BPE of 320 ids), built here when missing
(needs the dict-wn and dict-gcide packages) with
    omnigpt data build --sources dict-wn,dict-gcide --tokenizer train:320 --out runs/corpora/dict320
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

from benchmarks.scaling_cpu_ladder import RECIPE, VOCAB, ensure_corpus, print_table  # noqa: E402  (one recipe for both ladders)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=("small", "target", "all"), default="all")
    ap.add_argument("--data", default=str(ROOT / "runs" / "corpora" / f"dict{VOCAB}"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "scaling-gpu"))
    ap.add_argument("--values", default="8,12,16,20,24")  # the largest, 24, is 1/1360 of the target's compute
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--target", default="192")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    from omnigpt.data.shards import read_manifest
    from omnigpt.scaling.ladder import LadderSpec, corpus_vocab, plan_run

    ensure_corpus(Path(args.data), "dict-wn,dict-gcide")
    train_tokens = read_manifest(args.data)["totals"]["train"]["tokens"]
    spec = LadderSpec()  # RECIPE spells out these defaults
    t = plan_run(int(args.target), spec, corpus_vocab(args.data))
    print(f"target {t.name}: N={t.params:,} D={t.tokens:,} C={t.flops:.3g}; the corpus has {train_tokens:,} training "
          f"tokens ({t.tokens / train_tokens:.2f} epochs); {t.steps:,} steps of {t.batch_size} x {t.cfg.max_seq_len}", flush=True)
    base = [sys.executable, "-m", "omnigpt.cli", "scaling", "predict", "--data", args.data, "--out", args.out,
            "--values", args.values, "--seeds", args.seeds, "--target", args.target, "--device", args.device,
            "--max-fraction", "0.001", *RECIPE]
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
    print_table(pred)
    return 0


if __name__ == "__main__":
    sys.exit(main())
