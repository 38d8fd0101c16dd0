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

Recipe: width dial at depth 2, SwiGLU, seq 128; every run trains on 20 tokens per matmul parameter in batches of
4 x 128 tokens with AdamW at lr 5e-3 * 64/width (omnigpt.scaling.ladder.LadderSpec). Two families:

- fixed-attention (default): 2 heads x 16 dims of attention at every width, the dial moving the residual stream,
  MLP and embeddings, so the small members use context as the large ones do; the law is fitted against 6ND.
  Fit runs: widths 8-20 x 20 seeds (width 20 uses 1/408 of the target's FLOPs); target width 160.
- ladder (--family ladder): 2 heads of width/2 dims; fitted against FLOPs; widths 8-24 x 5 seeds (24: 1/104);
  target width 96. Its loss curve steepens past the fit range (benchmarks/RESULTS.md): +3.7%.

    omnigpt scaling predict --data CORPUS --out OUT --values 8,12,16,20 --seeds 0,...,19 --target 160 \
        --fixed-attention --n-heads 2 --head-dim 16 --fit-axis 6nd --threads 1 ...
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
          "--downstream", "dict-cont", "--mc-items", "600"]
PREDICT = ["--irreducible", "0", "--downstream-metric", "mc_logp_pass,mc_logp_correct,mc_acc"]  # `predict` only
VOCAB = 320  # byte-level BPE ids of the ladders' corpora
FAMILIES = {  # extra flags, fit values, seeds, target
    "fixed-attention": (["--fixed-attention", "--n-heads", "2", "--head-dim", "16", "--fit-axis", "6nd"],
                        "8,12,16,20", ",".join(map(str, range(20))), "160"),
    "ladder": (["--n-heads", "2", "--fit-axis", "flops"], "8,12,16,20,24", "0,1,2,3,4", "96"),
}


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
    ap.add_argument("--family", choices=list(FAMILIES), default="fixed-attention")
    ap.add_argument("--out", help="default runs/scaling-cpu-fixattn (fixed-attention) or runs/scaling-cpu (ladder)")
    ap.add_argument("--values", help="fit widths (default: the family's)")
    ap.add_argument("--seeds", help="seeds of every fit width (default: the family's)")
    ap.add_argument("--target", help="target width (default: the family's)")
    ap.add_argument("--threads", default="1")
    args = ap.parse_args()
    flags, values, seeds, target = FAMILIES[args.family]
    out = args.out or str(ROOT / "runs" / ("scaling-cpu-fixattn" if args.family == "fixed-attention" else "scaling-cpu"))
    data = ensure_corpus(Path(args.data))
    cmd = [sys.executable, "-m", "omnigpt.cli", "scaling", "predict", "--data", str(data), "--out", out,
           "--values", args.values or values, "--seeds", args.seeds or seeds, "--target", args.target or target,
           "--threads", args.threads, *RECIPE, *PREDICT, *flags]
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    wall = time.time() - t0
    pred = Path(out) / "prediction.json"
    if pred.is_file():
        doc = json.loads(pred.read_text())
        doc["wall_seconds"] = round(wall, 1)
        pred.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwall time {wall / 60:.1f} min; {pred}")
        print_table(doc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
