"""Cross-fusion probe on CPU: one variant of the cross-attention VLM trained on a few question types, then scored.

Why: a ShapeBind GPU run costs 8 of a session's 30 device minutes, and cross fusion's failures (runs 10-17 in
benchmarks/RESULTS.md) are about *which* latents the text finds and what they carry. This probe keeps what matters for
that (a CLIP-trained ViT, grid latents, the pointer loss, colour / shape / where / position questions, N up to 3) at
toy size, so two variants train side by side on 2 CPU cores in minutes. Toy geometry: 64 px scenes, 8 px patches, a
large shape 12 px. So n_latents=64 (one patch each) and resampler_halo=1 (24 px) are, relative to the shapes, what
the GPU recipe's 64 latents (16 px) and halo 1 (48 px) are. Known limit (RESULTS.md, runs 15-17): at the default
sizes the toy ViT does not tell shapes apart, so questions that name an object by its shape cannot bind; give it
larger sizes with --set (image_size, vision) before trusting a difference there.

The ViT is CLIP-trained once and cached in --cache (omnigpt.train.vlm.clip_vit), so variants start from the same encoder:

    python benchmarks/vision_cross_probe.py --name base --threads 1               # the first call trains CLIP (~1 min)
    python benchmarks/vision_cross_probe.py --name halo --threads 1 --set resampler_halo=1 n_latents=64

Each run appends one JSON line (accuracy by N and type, losses, seconds) to <cache>/results.jsonl and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnigpt.config import ModelConfig  # noqa: E402
from omnigpt.data.vision_samples import Mix, ScenePool, shapebind_tokenizer  # noqa: E402
from omnigpt.evals.vqa import eval_vqa, format_table  # noqa: E402
from omnigpt.model.transformer import Transformer  # noqa: E402
from omnigpt.train.vlm import DataConfig, build_vlm, clip_vit, quick_recipe, train_vlm, vit_from_file, vlm_stages  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="this variant's name in results.jsonl")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON", help="recipe overrides (train.vlm.Recipe)")
    ap.add_argument("--steps", type=int, default=1500, help="joint steps")
    ap.add_argument("--types", default="color,shape,where,position")
    ap.add_argument("--n-train", type=int, nargs=2, default=(1, 3))
    ap.add_argument("--per-type", type=int, default=40)
    ap.add_argument("--cache", default="runs/cross_probe")
    ap.add_argument("--vit", default=None, help="start from this CLIP-trained ViT of the recipe (vit_<key>.safetensors)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=250, help="joint steps between step lines")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    types = tuple(args.types.split(","))
    n_lo, n_hi = args.n_train
    recipe = quick_recipe().override([f"n_train=[{n_lo},{n_hi}]", f"n_eval={list(range(n_lo, n_hi + 1))}",
                                      "ground_weight=0.5", "ground_layer=0", *args.set])
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok = shapebind_tokenizer()
    pool = ScenePool(recipe.pool_scenes, recipe.n_train, recipe.image_size, "pool")
    torch.manual_seed(0)
    vit = vit_from_file(args.vit, recipe) if args.vit else clip_vit(recipe, tok, pool, torch.device("cpu"), cache_dir=cache)[0]
    torch.manual_seed(args.seed)
    lm = Transformer(ModelConfig(vocab_size=tok.padded_vocab_size(), **recipe.text))
    vlm = build_vlm(recipe, "cross", tok, vit, lm)
    align, *joints = vlm_stages(replace(recipe, steps_joint=args.steps), "cross")  # two with curriculum_n
    joints = [replace(j, mix=Mix(qa=1.0, qa_types=types, ground=j.ground_weight > 0)) for j in joints]
    data = DataConfig(batch_size=recipe.batch_size, n_range=recipe.n_train, image_size=recipe.image_size,
                      max_len=recipe.text["max_seq_len"] + 1)
    stages = train_vlm(vlm, tok, [align, *joints], data, log=print, log_every=args.log_every, pool=pool)
    res = eval_vqa(vlm, tok, recipe.n_eval, args.per_type, types=types, log=print)
    row = {"name": args.name, "set": args.set, "vit": args.vit, "steps": args.steps, "types": types, "seed": args.seed,
           "by_n": res["by_n"], "loss": stages[-1]["loss"], "seconds": round(time.perf_counter() - t0, 1),
           "recipe": asdict(recipe)}
    with open(cache / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(format_table({args.name: res}))
    print(f"{args.name}: final joint loss {stages[-1]['loss']:.3f}, {row['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
