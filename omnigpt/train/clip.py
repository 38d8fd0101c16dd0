"""Contrastive image-text pre-training (CLIP, or SigLIP's sigmoid loss) of a ViT on ShapeBind captions, optionally
mixed with emoji / clip-art captions. The vision tower then initialises a VLM's encoder.

Batches: B images with their captions (token ids + <|endoftext|>, right-padded; the text tower pools at the last
real token). Captions can repeat within a batch (small scenes): identical captions count as positives.

Captions alone teach the ViT little about shape: a batch's scenes differ enough in colour, and a CLIP-trained
ViT's patch tokens then say their object's colour but hardly its shape (benchmarks/vision_shape_probe.py), which a
VLM needs to find "the diamond". Two levers: shape negatives (a scene beside its twin with one shape changed, told
apart only by that shape) and a dense shape loss (a linear head on every patch names the shape of the object there,
scenes.patch_shapes; the head is dropped after training).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from omnigpt.data import scenes as sb
from omnigpt.data.vision_samples import IGNORE, draw_scene
from omnigpt.model.vision import CLIP, CLIPConfig, normalize
from omnigpt.train.optim import build_optimizer, set_lr
from omnigpt.train.vlm import Clock, autocast_for, lr_at, model_device


@dataclass
class CLIPTrainConfig:
    steps: int = 500
    budget_s: float | None = None  # stop after this many seconds (the schedule follows elapsed time)
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 50
    n_range: tuple[int, int] = (1, 16)
    image_size: int = 128
    real_frac: float = 0.0  # share of emoji / clip-art pairs (when installed)
    captions: str = "plain"  # scenes: "plain" (scenes.caption) or "located" (scenes.located_caption: every object's cell)
    hard_negatives: float = 0.0  # share of scenes followed in the batch by their scenes.rebind twin (what is where differs)
    shape_negatives: float = 0.0  # share followed by their scenes.change_shape twin (one object's shape differs)
    dense_shape: float = 0.0  # + this x a per-patch loss: a linear head on the ViT's patches names the shape there
    workers: int = 0
    seed: int = 0
    log_every: int = 50

    def __post_init__(self):
        if self.captions not in ("plain", "located"):
            raise ValueError(f"CLIPTrainConfig.captions={self.captions!r}: expected 'plain' or 'located'")
        if not (0 <= self.hard_negatives and 0 <= self.shape_negatives and self.hard_negatives + self.shape_negatives <= 1):
            raise ValueError(f"CLIPTrainConfig: hard_negatives={self.hard_negatives} and shape_negatives="
                             f"{self.shape_negatives} are shares of the scenes: each >= 0, together <= 1")


def caption_batch(tok, images: list[np.ndarray], captions: list[str], shapes: list[np.ndarray] | None = None):
    """(images uint8 (B, H, W, 3), ids (B, T), lengths (B,), same (B, B) bool, shapes (B, P): each patch's
    scenes.patch_shapes label, IGNORE for an image without one; (B, 0) when not asked for)."""
    encoded = [tok.encode(c) + [tok.eot_id] for c in captions]
    T = max(map(len, encoded))
    ids = torch.full((len(encoded), T), tok.pad_id, dtype=torch.long)
    for b, e in enumerate(encoded):
        ids[b, : len(e)] = torch.tensor(e)
    lengths = torch.tensor([len(e) for e in encoded])
    index = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    keys = torch.tensor([index[c] for c in captions])
    shapes_BP = torch.from_numpy(np.stack(shapes)) if shapes else torch.zeros(len(images), 0, dtype=torch.long)
    return torch.from_numpy(np.stack(images)), ids, lengths, keys.unsqueeze(0) == keys.unsqueeze(1), shapes_BP


class CaptionStream(torch.utils.data.IterableDataset):
    """Batches of caption_batch. label_grid > 0: with each scene's patch_shapes on that grid (the ViT's patch grid)."""

    def __init__(self, tok, tc: CLIPTrainConfig, real_pairs=None, seed_ns: str = "clip", pool=None, label_grid: int = 0):
        self.tok, self.tc, self.real_pairs, self.seed_ns, self.pool = tok, tc, real_pairs or [], seed_ns, pool
        self.label_grid = label_grid

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        rng = random.Random(f"{self.seed_ns}:{self.tc.seed}:{worker}")
        tc = self.tc
        while True:
            images, captions, shapes, twin = [], [], [], None
            for _ in range(tc.batch_size):
                if self.real_pairs and rng.random() < tc.real_frac:
                    from omnigpt.data.image_captions import load_pair_image

                    pair = rng.choice(self.real_pairs)
                    images.append(np.asarray(load_pair_image(pair, tc.image_size)))
                    captions.append(pair.caption)
                    if self.label_grid:
                        shapes.append(np.full(self.label_grid ** 2, IGNORE, dtype=np.int64))
                else:
                    if twin is not None:  # the previous scene, rebound or with one shape changed
                        scene, image, twin = twin, sb.render_array(twin), None
                    else:
                        scene, image = draw_scene(rng, tc.n_range, tc.image_size, f"{self.seed_ns}{worker}", self.pool)
                        u = rng.random()
                        if u < tc.hard_negatives:
                            twin = sb.rebind(scene, rng.randrange(1 << 30))
                        elif u < tc.hard_negatives + tc.shape_negatives:
                            twin = sb.change_shape(scene, rng.randrange(1 << 30))
                    images.append(image)
                    captions.append(sb.located_caption(scene) if tc.captions == "located" else sb.caption(scene))
                    if self.label_grid:
                        shapes.append(sb.patch_shapes(scene, self.label_grid))
            yield caption_batch(self.tok, images, captions, shapes or None)


def caption_batches(tok, tc: CLIPTrainConfig, real_pairs=None, seed_ns: str = "clip", pool=None, label_grid: int = 0):
    stream = CaptionStream(tok, tc, real_pairs, seed_ns, pool, label_grid)
    if tc.workers <= 0:
        return iter(stream)
    return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=tc.workers, prefetch_factor=4))


@torch.no_grad()
def retrieval_accuracy(model: CLIP, batch) -> float:
    """Image -> caption top-1 accuracy within a batch (a retrieved caption identical to the true one counts)."""
    device = model_device(model)
    images, ids, lengths, same, _ = (t.to(device) for t in batch)
    with autocast_for(device):
        _, logits = model(normalize(images, model.cfg.vision), ids, lengths, same)
    best = logits.argmax(-1)
    return same[torch.arange(len(best), device=device), best].float().mean().item()


@torch.no_grad()
def object_shape_accuracy(model: CLIP, head: torch.nn.Module, batch) -> float:
    """The dense shape head's top-1 on the patches that lie on an object (background patches, most of an image and
    easy, left out): how well the ViT's patches say the shape of what is at them, which a grid resampler's latents
    need to find an object named by its shape (the ViT of runs 30-34 in benchmarks/RESULTS.md: retrieval top-1 0.99,
    shape probe .31)."""
    device = model_device(model)
    images, _, _, _, shapes_BP = (t.to(device) for t in batch)
    with autocast_for(device):
        patches = model.vision(normalize(images, model.cfg.vision)).tokens[:, -shapes_BP.shape[1]:]
        pred = head(patches).argmax(-1)
    on_object = shapes_BP > 0
    return (pred == shapes_BP)[on_object].float().mean().item() if bool(on_object.any()) else math.nan


def train_clip(model: CLIP, tok, tc: CLIPTrainConfig, real_pairs=None, log=print, metrics_path: str | None = None,
               pool=None) -> dict:
    """Contrastive training (and with tc.dense_shape the per-patch shape loss, whose head is dropped afterwards);
    {"steps", "loss", "retrieval_top1" (held out), "seconds"} (+ "dense_loss", "object_shape_top1" (held out))."""
    device = model_device(model)
    model.train()
    dense = tc.dense_shape > 0
    head = torch.nn.Linear(model.cfg.vision.d_model, 1 + len(sb.SHAPES)).to(device) if dense else None
    trained = torch.nn.ModuleList([model] + ([head] if dense else []))
    opt = build_optimizer(trained, "adamw", lr=tc.lr, weight_decay=tc.weight_decay)
    it = caption_batches(tok, tc, real_pairs, pool=pool, label_grid=model.cfg.vision.grid if dense else 0)
    seen = {}
    hook = model.vision.register_forward_hook(lambda m, i, out: seen.update(tokens=out.tokens)) if dense else None
    autocast = autocast_for(device)
    metrics = open(metrics_path, "a") if metrics_path else None
    clock, step, warmup = Clock(tc.steps, tc.budget_s), 0, min(tc.warmup, tc.steps // 5)
    dense_loss = None
    while not clock.done(step):
        set_lr(opt, lr_at(step, clock.progress(step), warmup))
        images, ids, lengths, same, shapes_BP = (t.to(device, non_blocking=True) for t in next(it))
        with autocast:
            loss, _ = model(normalize(images, model.cfg.vision), ids, lengths, same)
            if dense:
                patches = seen.pop("tokens")[:, -shapes_BP.shape[1]:]  # a class token, if any, comes first
                dense_loss = F.cross_entropy(head(patches).float().flatten(0, 1), shapes_BP.flatten(), ignore_index=IGNORE)
                loss = loss + tc.dense_shape * dense_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 10 == 0:
            loss.item()  # wait for the GPU, so that a time budget is measured honestly
        if step % tc.log_every == 0 or step == 1:
            rec = {"step": step, "loss": loss.item(), "seconds": clock.elapsed()}
            if dense:
                rec["dense_loss"] = dense_loss.item()
            log(f"[clip] step {step} loss {rec['loss']:.4f}" + (f" (dense shape {rec['dense_loss']:.4f})" if dense else "")
                + f" {rec['seconds']:.0f}s")
            if metrics:
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
    if hook is not None:
        hook.remove()
    held_out = CLIPTrainConfig(**{**tc.__dict__, "seed": tc.seed + 10_000, "workers": 0, "real_frac": 0.0})
    held_batch = next(iter(CaptionStream(tok, held_out, seed_ns="clip-eval", label_grid=model.cfg.vision.grid if dense else 0)))
    acc = retrieval_accuracy(model, held_batch)
    shape_acc = object_shape_accuracy(model, head, held_batch) if dense else None
    log(f"[clip] done: {step} steps in {clock.elapsed():.0f}s, loss {loss.item():.4f}; held-out image->caption top-1 "
        f"in batches of {tc.batch_size}: {acc:.3f}" + (f"; shape top-1 on object patches {shape_acc:.3f}" if dense else ""))
    if metrics:
        metrics.close()
    res = {"steps": step, "loss": loss.item(), "retrieval_top1": acc, "seconds": clock.elapsed()}
    return res if dense_loss is None else {**res, "dense_loss": dense_loss.item(), "object_shape_top1": shape_acc}


def save_clip(model: CLIP, out_dir: str, tok=None) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"omnigpt_clip": model.cfg.to_dict()}, indent=2))
    if tok is not None:
        tok.save(str(out / "tokenizer"))
    return out


def load_clip(path: str, device="cpu") -> CLIP:
    from safetensors.torch import load_file

    from omnigpt.model.weights import load_state_dict_checked

    raw = json.loads((Path(path) / "config.json").read_text())
    if "omnigpt_clip" not in raw:
        raise ValueError(f"{path}: config.json has no 'omnigpt_clip' (not an omnigpt CLIP checkpoint)")
    model = CLIP(CLIPConfig.from_dict(raw["omnigpt_clip"]))
    load_state_dict_checked(model, load_file(str(Path(path) / "model.safetensors")), source=str(path))
    return model.to(device)
