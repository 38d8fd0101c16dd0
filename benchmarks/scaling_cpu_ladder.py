"""The CPU scaling ladder: predict a model's final validation loss from runs with <= 1/100 of its compute, then
train it and report the error (and the same for one downstream metric). Budget: about 12 minutes on 2 cores.

    python benchmarks/scaling_cpu_ladder.py                       # builds runs/corpora/wn512 first if needed
    python benchmarks/scaling_cpu_ladder.py --data CORPUS --out runs/scaling-cpu

Corpus: WordNet (the `dict-wn` offline source, `apt-get install dict-wn`) tokenized with a byte-level BPE of 512
ids trained on it (`omnigpt data build --sources dict-wn --tokenizer train:512`): 11.2M tokens, 590 held-out
entries. Without WordNet the script falls back to the synthetic Markov corpus of omnigpt.train.synthetic (then
the downstream metric is skipped: it needs dictionary entries).

Family: width dial at depth 2, 2 heads, SwiGLU, vocab 512, seq 128; every run trains on 20 tokens per matmul
parameter in 300 optimizer steps with AdamW at lr 1e-2 * 64/width (omnigpt.scaling.ladder.LadderSpec). One command:

    omnigpt scaling predict --data CORPUS --out OUT --values 8,12,16,20 --seeds 0,1,2 --target 96 --threads 1 ...
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RECIPE = ["--dial", "width", "--depth", "2", "--seq-len", "128", "--tokens-per-param", "20", "--lr", "0.01",
          "--lr-ref-width", "64", "--lr-width-power", "1.0", "--steps-ref", "300", "--steps-power", "0",
          "--downstream", "dict-cont", "--mc-items", "600"]


def ensure_corpus(path: Path) -> Path:
    if (path / "manifest.json").is_file():
        return path
    sys.path.insert(0, str(ROOT))
    from omnigpt.data.sources import SOURCES

    if SOURCES["dict-wn"].present():
        cmd = [sys.executable, "-m", "omnigpt.cli", "data", "build", "--sources", "dict-wn", "--tokenizer", "train:512",
               "--out", str(path), "--workers", "2"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    else:
        from omnigpt.train.synthetic import write_synthetic_corpus

        print("dict-wn is not installed: using the synthetic Markov corpus", flush=True)
        write_synthetic_corpus(path, {"markov": 60000}, vocab=512, val_docs=600)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT / "runs" / "corpora" / "wn512"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "scaling-cpu"))
    ap.add_argument("--values", default="8,12,16,20")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--target", default="96")
    ap.add_argument("--threads", default="1")
    args = ap.parse_args()
    data = ensure_corpus(Path(args.data))
    cmd = [sys.executable, "-m", "omnigpt.cli", "scaling", "predict", "--data", str(data), "--out", args.out,
           "--values", args.values, "--seeds", args.seeds, "--target", args.target, "--threads", args.threads,
           "--downstream-metric", "mc_acc", *RECIPE]
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    wall = time.time() - t0
    pred = Path(args.out) / "prediction.json"
    if pred.is_file():
        doc = json.loads(pred.read_text())
        doc["wall_seconds"] = round(wall, 1)
        pred.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwall time {wall / 60:.1f} min; {pred}")
        for k, p in doc["predictions"].items():
            if p and p.get("actual") is not None:
                print(f"  {k:16s} predicted {p['predicted']:.4f}  actual {p['actual']:.4f}  error {100 * p['error']:+.2f}%")
    return rc


if __name__ == "__main__":
    sys.exit(main())
