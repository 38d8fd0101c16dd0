"""Contrastive image-text pre-training (CLIP, or SigLIP's sigmoid loss) of a ViT on ShapeBind captions, optionally
mixed with emoji / clip-art captions. The vision tower then initialises a VLM's encoder.

Batches: B images with their captions (token ids + <|endoftext|>, right-padded; the text tower pools at the last
real token). Captions can repeat within a batch (small scenes): identical captions count as positives.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from omnigpt.data import scenes as sb
from omnigpt.data.vision_samples import draw_scene
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
    workers: int = 0
    seed: int = 0
    log_every: int = 50

    def __post_init__(self):
        if self.captions not in ("plain", "located"):
            raise ValueError(f"CLIPTrainConfig.captions={self.captions!r}: expected 'plain' or 'located'")


def caption_batch(tok, images: list[np.ndarray], captions: list[str]):
    """(images uint8 (B, H, W, 3), ids (B, T), lengths (B,), same (B, B) bool)."""
    encoded = [tok.encode(c) + [tok.eot_id] for c in captions]
    T = max(map(len, encoded))
    ids = torch.full((len(encoded), T), tok.pad_id, dtype=torch.long)
    for b, e in enumerate(encoded):
        ids[b, : len(e)] = torch.tensor(e)
    lengths = torch.tensor([len(e) for e in encoded])
    index = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    keys = torch.tensor([index[c] for c in captions])
    return torch.from_numpy(np.stack(images)), ids, lengths, keys.unsqueeze(0) == keys.unsqueeze(1)


class CaptionStream(torch.utils.data.IterableDataset):
    def __init__(self, tok, tc: CLIPTrainConfig, real_pairs=None, seed_ns: str = "clip", pool=None):
        self.tok, self.tc, self.real_pairs, self.seed_ns, self.pool = tok, tc, real_pairs or [], seed_ns, pool

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        rng = random.Random(f"{self.seed_ns}:{self.tc.seed}:{worker}")
        tc = self.tc
        while True:
            images, captions, twin = [], [], None
            for _ in range(tc.batch_size):
                if self.real_pairs and rng.random() < tc.real_frac:
                    from omnigpt.data.image_captions import load_pair_image

                    pair = rng.choice(self.real_pairs)
                    images.append(np.asarray(load_pair_image(pair, tc.image_size)))
                    captions.append(pair.caption)
                else:
                    if twin is not None:  # the previous scene's objects dealt to its cells in another order
                        scene, image, twin = twin, sb.render_array(twin), None
                    else:
                        scene, image = draw_scene(rng, tc.n_range, tc.image_size, f"{self.seed_ns}{worker}", self.pool)
                        if rng.random() < tc.hard_negatives:
                            twin = sb.rebind(scene, rng.randrange(1 << 30))
                    images.append(image)
                    captions.append(sb.located_caption(scene) if tc.captions == "located" else sb.caption(scene))
            yield caption_batch(self.tok, images, captions)


def caption_batches(tok, tc: CLIPTrainConfig, real_pairs=None, seed_ns: str = "clip", pool=None):
    stream = CaptionStream(tok, tc, real_pairs, seed_ns, pool)
    if tc.workers <= 0:
        return iter(stream)
    return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=tc.workers, prefetch_factor=4))


@torch.no_grad()
def retrieval_accuracy(model: CLIP, batch) -> float:
    """Image -> caption top-1 accuracy within a batch (a retrieved caption identical to the true one counts)."""
    device = model_device(model)
    images, ids, lengths, same = (t.to(device) for t in batch)
    with autocast_for(device):
        _, logits = model(normalize(images, model.cfg.vision), ids, lengths, same)
    best = logits.argmax(-1)
    return same[torch.arange(len(best), device=device), best].float().mean().item()


def train_clip(model: CLIP, tok, tc: CLIPTrainConfig, real_pairs=None, log=print, metrics_path: str | None = None,
               pool=None) -> dict:
    device = model_device(model)
    model.train()
    opt = build_optimizer(model, "adamw", lr=tc.lr, weight_decay=tc.weight_decay)
    it = caption_batches(tok, tc, real_pairs, pool=pool)
    autocast = autocast_for(device)
    metrics = open(metrics_path, "a") if metrics_path else None
    clock, step, warmup = Clock(tc.steps, tc.budget_s), 0, min(tc.warmup, tc.steps // 5)
    while not clock.done(step):
        set_lr(opt, lr_at(step, clock.progress(step), warmup))
        images, ids, lengths, same = (t.to(device, non_blocking=True) for t in next(it))
        with autocast:
            loss, _ = model(normalize(images, model.cfg.vision), ids, lengths, same)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 10 == 0:
            loss.item()  # wait for the GPU, so that a time budget is measured honestly
        if step % tc.log_every == 0 or step == 1:
            rec = {"step": step, "loss": loss.item(), "seconds": clock.elapsed()}
            log(f"[clip] step {step} loss {rec['loss']:.4f} {rec['seconds']:.0f}s")
            if metrics:
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
    held_out = CLIPTrainConfig(**{**tc.__dict__, "seed": tc.seed + 10_000, "workers": 0, "real_frac": 0.0})
    acc = retrieval_accuracy(model, next(iter(CaptionStream(tok, held_out, seed_ns="clip-eval"))))
    log(f"[clip] done: {step} steps in {clock.elapsed():.0f}s, loss {loss.item():.4f}; held-out image->caption top-1 "
        f"in batches of {tc.batch_size}: {acc:.3f}")
    if metrics:
        metrics.close()
    return {"steps": step, "loss": loss.item(), "retrieval_top1": acc, "seconds": clock.elapsed()}


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
