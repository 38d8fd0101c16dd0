"""Re-score the policies of an align_demo run on its held-out prompts with more evaluation seeds: the verified score
(temperature 1) averaged over seeds, its standard error over the seeds, and the ShapeBind score per question type.

    python benchmarks/align_reeval.py runs/align_demo --seeds 5                       # every policy the run wrote
    python benchmarks/align_reeval.py runs/align_demo --policies sft ppo --seeds 10

The demo's own table uses one evaluation seed (4 samples per prompt); differences of a few hundredths between two
policies are within that seed's noise, and this says whether they hold up. Writes RUN/reeval.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import torch

from omnigpt.align.data import load_prompts
from omnigpt.align.modeling import load_policy, resolve_model_dir
from omnigpt.align.rollout import evaluate_policy
from omnigpt.tokenizer.text import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="an align_demo --out folder")
    ap.add_argument("--policies", nargs="*", default=None, help="default: those in RUN/results.json")
    ap.add_argument("--seeds", type=int, default=5, help="evaluation seeds (1000, 1001, ...)")
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt and seed")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    report = json.loads((run / "results.json").read_text())
    max_new = report["demo"]["max_new_tokens"]
    tok = load_tokenizer(str(run / "tokenizer"))
    heldout = load_prompts(run / "data" / "heldout.jsonl", need_task=True)
    scene = [p for p in heldout if p.task["kind"] == "shapebind"]
    by_type = defaultdict(list)
    for p in scene:
        by_type[p.task["type"]].append(p)
    out = {}
    for name in args.policies or list(report["results"]):
        model = load_policy(resolve_model_dir(run / "base") if name == "base" else run / name).eval()
        scores, types = [], defaultdict(list)
        for s in range(args.seeds):
            kw = dict(samples=args.samples, temperature=1.0, max_new_tokens=max_new, seed=1000 + s)
            scores.append(evaluate_policy(model, tok, heldout, **kw)["score"])
            for t, ps in by_type.items():
                types[t].append(evaluate_policy(model, tok, ps, **kw)["score"])
        se = statistics.stdev(scores) / len(scores) ** 0.5 if len(scores) > 1 else float("nan")
        out[name] = {"score": statistics.mean(scores), "se": se, "per_seed": scores,
                     "shapebind": {t: statistics.mean(v) for t, v in sorted(types.items())}}
        sb = " ".join(f"{t} {v:.2f}" for t, v in out[name]["shapebind"].items())
        print(f"{name:>14}: {out[name]['score']:.3f} ± {se:.3f} over {args.seeds} seeds | shapebind {sb}", flush=True)
    print("shapebind held-out prompts per type: " + ", ".join(f"{t} {len(v)}" for t, v in sorted(by_type.items())))
    (run / "reeval.json").write_text(json.dumps({"seeds": args.seeds, "samples": args.samples, "policies": out,
                                                "shapebind_prompts": {t: len(v) for t, v in by_type.items()}}, indent=2))


if __name__ == "__main__":
    main()
