"""Do a CLIP-trained ViT's patch tokens still say what is *at* them, layer by layer? (issue 5, position questions)

ShapeBind's inline VLM answers colour questions about one of several objects at 95% but "where is the red star?"
at the rate of guessing among the occupied cells. One explanation: CLIP's mean-pooled contrastive loss trains the
last block's tokens to carry the whole scene (every token "says" the caption), so the LM can bind attributes from
any token but cannot find *which* tokens hold the named object, and so cannot read their position. LLaVA feeds the
penultimate layer for a related reason. This measures it: train a small CLIP on ShapeBind captions, then, per
block, fit a linear probe from the token at an object's centre to that object's colour and test it on fresh
scenes. A token that holds its own object scores high at every N; a token that holds the scene drifts towards
the colours of the other objects as N grows (the "other" column: wrong answers that name another object's colour).
The last column asks the converse: from the empty patch farthest from a lone object, that object's colour (chance
1/8 for a local token).

    python benchmarks/vision_token_locality.py                      # ~6 min on 2 CPU cores
    python benchmarks/vision_token_locality.py --steps 0            # the same probe on the untrained ViT
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnigpt.data import scenes as sb  # noqa: E402
from omnigpt.data.vision_samples import shapebind_tokenizer  # noqa: E402
from omnigpt.model.vision import CLIP, CLIPConfig, TextTowerConfig, VisionConfig, normalize  # noqa: E402
from omnigpt.train.clip import CLIPTrainConfig, train_clip  # noqa: E402

COLORS = list(sb.COLORS)


def scene_tokens(vision, scenes: list[sb.Scene], layer: int, batch: int = 128):
    """Yields (scene index, scene, its (gh*gw, D) tokens after block `layer`, (gh, gw))."""
    for i in range(0, len(scenes), batch):
        chunk = scenes[i:i + batch]
        pixels = normalize(torch.from_numpy(np.stack([sb.render_array(s) for s in chunk])), vision.cfg)
        with torch.no_grad():
            tokens, grid = vision.patch_tokens(pixels, layer)
        for b, s in enumerate(chunk):
            yield i + b, s, tokens[b].float(), grid


def centre_tokens(vision, scenes: list[sb.Scene], layer: int):
    """(features (K, D), colour index (K,), scene index (K,)) for the token under each object's centre."""
    feats, labels, owner = [], [], []
    for i, s, tokens, (gh, gw) in scene_tokens(vision, scenes, layer):
        for o in s.objects:
            r, c = min(gh - 1, int(o.cy * gh / s.image_size)), min(gw - 1, int(o.cx * gw / s.image_size))
            feats.append(tokens[r * gw + c])
            labels.append(COLORS.index(o.color))
            owner.append(i)
    return torch.stack(feats), torch.tensor(labels), torch.tensor(owner)


def background_tokens(vision, scenes: list[sb.Scene], layer: int):
    """(features (K, D), colour index (K,)) of one empty token per one-object scene, labelled with that object's
    colour: a token that holds only what is at it knows nothing about it (chance); a token that holds the scene does."""
    feats, labels = [], []
    for _, s, tokens, (gh, gw) in scene_tokens(vision, scenes, layer):
        (o,) = s.objects
        cell = s.image_size / gh
        # the empty patch farthest from the object
        far = max(range(gh * gw), key=lambda k: ((k // gw + 0.5) * cell - o.cy) ** 2 + ((k % gw + 0.5) * cell - o.cx) ** 2)
        feats.append(tokens[far])
        labels.append(COLORS.index(o.color))
    return torch.stack(feats), torch.tensor(labels)


def pooled_cells(vision, scenes: list[sb.Scene], layer: int):
    """(mean of the scene's tokens (S, D), label (S, 4)): per cell of the 2 x 2 grid (N <= 4) the colour of the
    object in it, or len(COLORS) if empty. Reading these from the pooled vector needs each object's colour *bound*
    to its place, which is what "where is the red star?" asks of an LM that has not learnt to attend to it."""
    feats, labels = [], []
    for _, s, tokens, _ in scene_tokens(vision, scenes, layer):
        cells = [len(COLORS)] * 4
        for o in s.objects:
            cells[o.row * s.grid + o.col] = COLORS.index(o.color)
        feats.append(tokens.mean(0))
        labels.append(cells)
    return torch.stack(feats), torch.tensor(labels)


def fit_probe(x: torch.Tensor, y: torch.Tensor, steps: int = 300, classes: int = len(COLORS)) -> torch.nn.Linear:
    probe = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(probe.parameters(), lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(x), y) + 1e-4 * probe.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400, help="CLIP steps (0: probe the untrained ViT)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--train-scenes", type=int, default=1500)
    ap.add_argument("--test-scenes", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--captions", default="plain", choices=("plain", "located"), help="CLIP captions (CLIPTrainConfig.captions)")
    ap.add_argument("--hard-negatives", type=float, default=0.0, help="CLIPTrainConfig.hard_negatives")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    tok = shapebind_tokenizer()
    vcfg = VisionConfig(image_size=args.image_size, patch_size=8, d_model=128, n_layers=4, n_heads=4, d_ff=512, pool="mean")
    ttc = TextTowerConfig(vocab_size=tok.padded_vocab_size(), max_len=256, d_model=128, n_layers=2, n_heads=4, d_ff=512)
    clip = CLIP(CLIPConfig(vcfg, ttc, embed_dim=64))
    if args.steps:  # the GPU recipe's CLIP stage, smaller: mean pooling, scene captions of 1-16 objects
        train_clip(clip, tok, CLIPTrainConfig(steps=args.steps, batch_size=128, lr=1e-3, n_range=(1, 16),
                                              image_size=args.image_size, log_every=100,
                                              captions=args.captions, hard_negatives=args.hard_negatives))
    vision = clip.vision.eval()
    rng = random.Random(0)
    make = lambda tag, k, ns: [sb.make_scene(f"{tag}{i}", rng.choice(ns), args.image_size) for i in range(k)]  # noqa: E731
    train_scenes = make("probe-train", args.train_scenes, (1, 2, 3, 4))
    tests = {n: make(f"probe-test{n}-", args.test_scenes, (n,)) for n in (1, 2, 4)}
    print(f"\ncentre-token colour probe, {len(COLORS)} colours (chance {1 / len(COLORS):.2f}); ViT {vcfg.n_layers}x{vcfg.d_model}, "
          f"patch {vcfg.patch_size}, {args.image_size}px, CLIP steps {args.steps}")
    empty_train = make("probe-empty-train", args.train_scenes, (1,))
    print("block  N=1 acc   N=2 acc  other   N=4 acc  other   empty token -> the object's colour (N=1)   "
          "pooled -> colour in each occupied cell, N=2 / N=4")
    for layer in range(vcfg.n_layers):
        x, y, _ = centre_tokens(vision, train_scenes, layer)
        mu, sd = x.mean(0), x.std(0) + 1e-6
        probe = fit_probe((x - mu) / sd, y)
        row = []
        for n, scenes in tests.items():
            xt, yt, owner = centre_tokens(vision, scenes, layer)
            with torch.no_grad():
                pred = probe((xt - mu) / sd).argmax(-1)
            acc = (pred == yt).float().mean().item()
            # wrong answers that name the colour of another object in the same scene
            others = [{COLORS.index(o.color) for o in scenes[int(s)].objects} for s in owner]
            other = sum(int(p) != int(t) and int(p) in os for p, t, os in zip(pred, yt, others)) / len(yt)
            row.append(f"{acc:7.3f}" + ("" if n == 1 else f"  {other:5.3f}"))
        xe, ye = background_tokens(vision, empty_train, layer)
        me, se = xe.mean(0), xe.std(0) + 1e-6
        empty_probe = fit_probe((xe - me) / se, ye)
        xt, yt = background_tokens(vision, tests[1], layer)
        with torch.no_grad():
            empty_acc = (empty_probe((xt - me) / se).argmax(-1) == yt).float().mean().item()
        xp, yp = pooled_cells(vision, train_scenes, layer)
        mp, sp = xp.mean(0), xp.std(0) + 1e-6
        cell_probes = [fit_probe((xp - mp) / sp, yp[:, k], classes=len(COLORS) + 1) for k in range(4)]
        bound = []
        for n in (2, 4):
            xt, yt = pooled_cells(vision, tests[n], layer)
            with torch.no_grad():
                pred = torch.stack([p((xt - mp) / sp).argmax(-1) for p in cell_probes], 1)
            occupied = yt != len(COLORS)
            bound.append((pred == yt)[occupied].float().mean().item())
        print(f"{layer + 1:5d}  " + "   ".join(row) + f"   {empty_acc:7.3f}" + " " * 34 + " / ".join(f"{b:.3f}" for b in bound),
              flush=True)
    print(f"({time.perf_counter() - t0:.0f}s; layer {vcfg.n_layers} is the post-normed output the VLM reads by default)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
