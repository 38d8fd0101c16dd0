"""The CPU scaling ladder: predict a model's final validation loss from runs with <= 1/100 of its compute, then
train it and report the error (and the same for downstream metrics). Budget: about 12 minutes on one core.

    python benchmarks/scaling_cpu_ladder.py                       # builds runs/corpora/wn320 first if needed
    python benchmarks/scaling_cpu_ladder.py --data CORPUS --out runs/scaling-cpu

Corpus: WordNet (the `dict-wn` offline source, `apt-get install dict-wn`) tokenized with a byte-level BPE of 320
ids (256 bytes, 32 specials, 32 merges) trained on it (`omnigpt data build --sources dict-wn --tokenizer
train:320`): 16.0M tokens, 590 held-out entries. With 512 ids the smallest widths spent most of their parameters
on the embedding/head and the loss curve steepened past width 32 (benchmarks/RESULTS.md). Without WordNet the
script falls back to the synthetic Markov corpus of omnigpt.train.synthetic (the downstream metrics are skipped:
they need dictionary entries).

Family: width dial at depth 2, 2 heads, SwiGLU, seq 128; every run trains on 20 tokens per matmul parameter in
batches of 4 x 128 tokens with AdamW at lr 5e-3 * 64/width (omnigpt.scaling.ladder.LadderSpec). Fit runs: widths
8-24 x 5 seeds (24 uses 1/104 of the target's compute); target width 96. One command:

    omnigpt scaling predict --data CORPUS --out OUT --values 8,12,16,20,24 --seeds 0,1,2,3,4 --target 96 --threads 1 ...
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One recipe for both ladders (benchmarks/scaling_ladder.py imports it); the values are LadderSpec's defaults,
# spelled out so that a changed default cannot silently change the published ladders.
RECIPE = ["--dial", "width", "--depth", "2", "--seq-len", "128", "--tokens-per-param", "20", "--batch-size", "4",
          "--lr", "0.005", "--lr-ref-width", "64", "--lr-width-power", "1.0", "--beta2", "0.95", "--warmup-frac", "0.05",
          "--downstream", "dict-cont", "--mc-items", "600", "--irreducible", "0",
          "--downstream-metric", "mc_logp_pass,mc_logp_correct,mc_acc"]
VOCAB = 320  # byte-level BPE ids of the ladders' corpora


def ensure_corpus(path: Path, sources: str = "dict-wn") -> Path:
    """Build the ladder corpus (the dictionary sources, a byte-level BPE of VOCAB ids) unless it exists."""
    if (path / "manifest.json").is_file():
        return path
    sys.path.insert(0, str(ROOT))
    from omnigpt.data.sources import SOURCES

    if all(SOURCES[s].present() for s in sources.split(",")):
        cmd = [sys.executable, "-m", "omnigpt.cli", "data", "build", "--sources", sources, "--tokenizer", f"train:{VOCAB}",
               "--out", str(path), "--workers", "2"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    else:
        from omnigpt.train.synthetic import write_synthetic_corpus

        print(f"{sources} is not installed: using the synthetic Markov corpus", flush=True)
        write_synthetic_corpus(path, {"markov": 60000}, vocab=512, val_docs=600)
    return path


def print_table(doc: dict) -> None:
    for k, p in doc["predictions"].items():
        actual = f"actual {p['actual']:.4f}" if p.get("actual") is not None else "actual (not trained)"
        if p.get("refused"):
            print(f"  {k:16s} refused ({p['refused']}); {actual}")
        elif p.get("error") is not None:
            print(f"  {k:16s} predicted {p['predicted']:.4f}  {actual}  error {100 * p['error']:+.2f}%")
        else:
            print(f"  {k:16s} predicted {p['predicted']:.4f}  {actual}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT / "runs" / "corpora" / f"wn{VOCAB}"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "scaling-cpu"))
    ap.add_argument("--values", default="8,12,16,20,24")  # the largest, 24, is 1/104 of the target's compute
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--target", default="96")
    ap.add_argument("--threads", default="1")
    args = ap.parse_args()
    data = ensure_corpus(Path(args.data))
    cmd = [sys.executable, "-m", "omnigpt.cli", "scaling", "predict", "--data", str(data), "--out", args.out,
           "--values", args.values, "--seeds", args.seeds, "--target", args.target, "--threads", args.threads, *RECIPE]
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
        print_table(doc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
