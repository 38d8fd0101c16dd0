"""Which summary of a latent's window still says the *shape* of the object there? (issue 5, cross fusion)

Run 23's pointer diagnostic (benchmarks/RESULTS.md) shows that cross fusion's colour errors at N = 4 come mostly
from finding the wrong place: a colour question names its object by shape, and cross fusion reads shape poorly
(74-79% at N = 1, against 89% for inline fusion). Inline fusion gives the LM pixel-shuffled tokens: the 2 x 2 patch
features of a 16 px place *concatenated*, so their arrangement survives. The resampler instead gives each place an
attention-weighted *average* of its window's patches. This probe asks whether that averaging is where shape is
lost, before any GPU time is spent on it. It loads the GPU recipe's CLIP-trained ViT (the one `--vit-cache` keeps,
6 x 256, 128 px scenes, 8 px patches) and fits linear probes (LBFGS, L2) from several summaries of the place that
holds an object's centre (an 8 x 8 grid of 16 px places, as the 64 grid latents) to that object's shape and colour
(and an MLP probe, one hidden layer, to its shape):

- patch:          the one patch token under the centre (256)
- narrow mean:    the mean of the place's own 2 x 2 patches (what a window query starts from; 256)
- narrow concat:  the same 4 patches concatenated (inline fusion's pixel shuffle; 1,024)
- wide mean:      the mean over the place and its halo of 1 (6 x 6 patches, 48 px; 256)
- wide 3x3 concat: the 3 x 3 places around it, each its narrow mean, concatenated (2,304)

    python benchmarks/vision_shape_probe.py --vit runs/vit_cache/vit_1d28269d42d8.safetensors   # ~70 s on 2 cores

Without --vit, it CLIP-trains the recipe's ViT first (omnigpt.train.vlm.clip_vit, cached in --cache), so a CLIP
setting can be compared on the CPU at a smaller size (--set recipe fields, e.g. clip_shape_negatives=0.5):

    S='image_size=128 vision={"patch_size":16,"d_model":128,"n_layers":4,"n_heads":4,"d_ff":512} steps_clip=600 budget_clip_s=null clip_batch_size=128 workers=0'
    python benchmarks/vision_shape_probe.py --places 4 --set $S                            # ~8 min on 2 cores
    python benchmarks/vision_shape_probe.py --places 4 --set $S clip_shape_negatives=0.5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnigpt.data import scenes as sb  # noqa: E402
from omnigpt.model.vision import ViT, normalize  # noqa: E402
from omnigpt.train.vlm import Recipe, vit_from_file  # noqa: E402

SHAPES, COLORS = list(sb.SHAPES), list(sb.COLORS)
SUMMARIES = ("patch", "narrow mean", "narrow concat", "wide mean", "wide 3x3 concat")


def place_summaries(tokens_PD: torch.Tensor, grid: int, places: int, r: int, c: int) -> dict[str, torch.Tensor]:
    """The summaries above of place (r, c) on a places x places grid over a grid x grid patch map."""
    s = grid // places
    t = tokens_PD.view(grid, grid, -1)
    own = t[r * s:(r + 1) * s, c * s:(c + 1) * s].reshape(s * s, -1)
    wide = t[max(0, (r - 1) * s):(r + 2) * s, max(0, (c - 1) * s):(c + 2) * s].reshape(-1, t.shape[-1])
    means = t.view(places, s, places, s, -1).mean((1, 3))  # (places, places, D): each place's narrow mean
    padded = F.pad(means.permute(2, 0, 1), (1, 1, 1, 1)).permute(1, 2, 0)  # zero places outside the image
    return {"patch": None, "narrow mean": own.mean(0), "narrow concat": own.flatten(),
            "wide mean": wide.mean(0), "wide 3x3 concat": padded[r:r + 3, c:c + 3].flatten()}


def features(vit: ViT, scenes: list[sb.Scene], places: int, batch: int = 64):
    """{summary: (K, d)}, shape labels (K,), colour labels (K,), N of each object's scene (K,)."""
    feats = {k: [] for k in SUMMARIES}
    shape, colour, n_of = [], [], []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i:i + batch]
        pixels = normalize(torch.from_numpy(np.stack([sb.render_array(s) for s in chunk])), vit.cfg)
        with torch.no_grad():
            tokens, (grid, _) = vit.patch_tokens(pixels.to(next(vit.parameters()).device))
        tokens = tokens.float().cpu()
        for b, s in enumerate(chunk):
            for o in s.objects:
                pr, pc = (min(grid - 1, int(v * grid / s.image_size)) for v in (o.cy, o.cx))
                r, c = pr * places // grid, pc * places // grid
                summ = place_summaries(tokens[b].float(), grid, places, r, c)
                summ["patch"] = tokens[b, pr * grid + pc].float()
                for k in SUMMARIES:
                    feats[k].append(summ[k])
                shape.append(SHAPES.index(o.shape))
                colour.append(COLORS.index(o.color))
                n_of.append(len(s.objects))
    return {k: torch.stack(v) for k, v in feats.items()}, torch.tensor(shape), torch.tensor(colour), torch.tensor(n_of)


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, steps: int = 200) -> torch.nn.Linear:
    probe = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(probe.parameters(), lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(x), y) + l2 * probe.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe


def fit_mlp_probe(x: torch.Tensor, y: torch.Tensor, classes: int, hidden: int = 256, steps: int = 400) -> torch.nn.Module:
    """One hidden layer: what a resampler's MLP and the pointer's keys could still pull out, where a line cannot."""
    probe = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, classes))
    opt = torch.optim.AdamW(probe.parameters(), lr=3e-3, weight_decay=0.05)
    for _ in range(steps):  # full batch: a few thousand rows
        opt.zero_grad()
        F.cross_entropy(probe(x), y).backward()
        opt.step()
    return probe


def standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu, sd = train.mean(0), train.std(0).clamp(min=1e-4)
    return (train - mu) / sd, (test - mu) / sd


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vit", default=None, help="a CLIP-trained ViT of the recipe (vit_<key>.safetensors); else trained")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON", help="recipe overrides (train.vlm.Recipe)")
    ap.add_argument("--cache", default="runs/vit_cache", help="where a ViT trained here is kept (clip_vit)")
    ap.add_argument("--train-scenes", type=int, default=2000)
    ap.add_argument("--test-scenes", type=int, default=400, help="per N")
    ap.add_argument("--n-test", default="1,4")
    ap.add_argument("--places", type=int, default=8, help="the latent grid (sqrt of n_latents)")
    ap.add_argument("--l2", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    recipe = Recipe().override(args.set)
    if args.vit:
        vit = vit_from_file(args.vit, recipe).eval()
    else:
        from omnigpt.data.vision_samples import ScenePool, shapebind_tokenizer
        from omnigpt.train.vlm import clip_vit

        pool = ScenePool(min(recipe.pool_scenes, 6000), recipe.n_train, recipe.image_size, "pool", workers=recipe.workers)
        vit = clip_vit(recipe, shapebind_tokenizer(), pool, torch.device(args.device), cache_dir=args.cache)[0].float().eval()
    vit = vit.to(args.device)
    train_scenes = [sb.make_scene(f"probe-train:{i}", 1 + i % 4, recipe.image_size) for i in range(args.train_scenes)]
    n_test = [int(n) for n in args.n_test.split(",")]
    test_scenes = [sb.make_scene(f"probe-test:{n}:{i}", n, recipe.image_size) for n in n_test for i in range(args.test_scenes)]
    tr, tr_shape, tr_colour, _ = features(vit, train_scenes, args.places)
    te, te_shape, te_colour, te_n = features(vit, test_scenes, args.places)
    print(f"{len(tr_shape)} training objects, {len(te_shape)} test objects; features {time.perf_counter() - t0:.0f}s")
    header = f"{'summary':<17}{'dims':>6}" + "".join(f"{f'shape N={n}':>12}" for n in n_test) + "".join(
        f"{f'(MLP) N={n}':>12}" for n in n_test) + "".join(f"{f'colour N={n}':>12}" for n in n_test)
    print(header + "\n" + "-" * len(header))
    for k in SUMMARIES:
        x_tr, x_te = standardise(tr[k], te[k])
        row = f"{k:<17}{x_tr.shape[1]:>6}"
        cells = []
        for y_tr, y_te, classes, fit in ((tr_shape, te_shape, len(SHAPES), fit_probe), (tr_shape, te_shape, len(SHAPES), fit_mlp_probe),
                                         (tr_colour, te_colour, len(COLORS), fit_probe)):
            probe = fit(x_tr, y_tr, classes, args.l2) if fit is fit_probe else fit(x_tr, y_tr, classes)
            with torch.no_grad():
                right = probe(x_te).argmax(-1) == y_te
            cells += [f"{float(right[te_n == n].float().mean()):>12.3f}" for n in n_test]
        print(row + "".join(cells), flush=True)
    print(f"chance: shape {1 / len(SHAPES):.3f}, colour {1 / len(COLORS):.3f}; total {time.perf_counter() - t0:.0f}s; "
          f"command: python benchmarks/vision_shape_probe.py {' '.join(sys.argv[1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
