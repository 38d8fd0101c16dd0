"""ShapeBind: inline (KOSMOS) vs cross-attention (Flamingo) fusion on the same encoder, data and steps.

Pipeline (one process): a ShapeBind BPE -> CLIP pre-training of the ViT on scene captions -> LM warm-up on scene
text -> for each fusion mode, a VLM from copies of that ViT and LM: connector alignment (ViT and LM frozen), then
joint fine-tuning -> held-out VQA accuracy by question type for N objects -> one table.

Target (GPU, < 9 minutes on one H100/H200, bf16 autocast): >= 95% on color and position questions for N <= 4,
and the curve up to N = 16, for both modes.

    python benchmarks/vision_shapebind.py                 # the GPU run
    python benchmarks/vision_shapebind.py --quick         # tiny sizes: an end-to-end check on CPU in minutes
Results: JSON in --out (default runs/vision_shapebind), and the table on stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnigpt.config import ModelConfig  # noqa: E402
from omnigpt.data.vision_samples import Mix, shapebind_tokenizer  # noqa: E402
from omnigpt.evals.vqa import eval_vqa, format_table, target_met  # noqa: E402
from omnigpt.model.multimodal import VLM, VLMConfig, save_vlm  # noqa: E402
from omnigpt.model.transformer import Transformer  # noqa: E402
from omnigpt.model.vision import CLIP, CLIPConfig, TextTowerConfig, VisionConfig  # noqa: E402
from omnigpt.train.clip import CLIPTrainConfig, train_clip  # noqa: E402
from omnigpt.train.vlm import DataConfig, Stage, train_stage, warmup_lm  # noqa: E402


@dataclass
class Plan:
    image_size: int = 128
    n_train: tuple[int, int] = (1, 16)
    n_eval: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16)
    per_type: int = 100
    vision: dict = field(default_factory=lambda: dict(patch_size=8, d_model=256, n_layers=6, n_heads=8, d_ff=1024))
    text: dict = field(default_factory=lambda: dict(d_model=384, n_layers=6, n_heads=6, n_kv_heads=6, d_ff=1024, max_seq_len=384))
    pixel_shuffle: int = 2  # inline: (128/8/2)^2 = 64 tokens per image
    n_latents: int = 64  # cross: the same 64 vectors per image
    cross_every: int = 1
    batch_size: int = 128
    clip_batch_size: int = 256
    steps_clip: int = 600
    steps_lm: int = 300
    steps_align: int = 300
    steps_joint: int = 2400
    lr: float = 1e-3
    workers: int = 10


def quick_plan() -> Plan:
    return Plan(image_size=64, n_train=(1, 4), n_eval=(1, 2, 3, 4), per_type=24,
                vision=dict(patch_size=8, d_model=96, n_layers=3, n_heads=4, d_ff=256),
                text=dict(d_model=96, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256, max_seq_len=160),
                pixel_shuffle=2, n_latents=16, batch_size=32, clip_batch_size=64,
                steps_clip=150, steps_lm=100, steps_align=100, steps_joint=600, lr=2e-3, workers=0)


def build_vlm(plan: Plan, mode: str, tok, vision, lm) -> VLM:
    cfg = VLMConfig(vision=vision.cfg, text=lm.cfg, image_id=tok.image_id, fusion=mode, connector="mlp",
                    pixel_shuffle=plan.pixel_shuffle if mode == "inline" else 1, n_latents=plan.n_latents,
                    cross_every=plan.cross_every)
    return VLM(cfg, vision=copy.deepcopy(vision), lm=copy.deepcopy(lm))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a CPU end-to-end check")
    ap.add_argument("--modes", default="inline,cross")
    ap.add_argument("--out", default="runs/vision_shapebind")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override Plan fields, e.g. steps_joint=3000")
    args = ap.parse_args(argv)
    plan = quick_plan() if args.quick else Plan()
    for kv in args.set:
        k, v = kv.split("=", 1)
        setattr(plan, k, type(getattr(plan, k))(json.loads(v)) if not isinstance(getattr(plan, k), (tuple, dict)) else json.loads(v))
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    log = lambda *m: print(f"{time.perf_counter() - t_start:6.0f}s", *m, flush=True)  # noqa: E731
    log(f"plan: {json.dumps(asdict(plan))}")
    log(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), torch {torch.__version__}")

    tok = shapebind_tokenizer()
    vocab = tok.padded_vocab_size()
    data = DataConfig(batch_size=plan.batch_size, n_range=plan.n_train, image_size=plan.image_size, workers=plan.workers)

    # 1. CLIP pre-training of the vision tower on scene captions
    vcfg = VisionConfig(image_size=plan.image_size, pool="mean", **plan.vision)
    clip = CLIP(CLIPConfig(vcfg, TextTowerConfig(vocab_size=vocab, max_len=256, d_model=plan.vision["d_model"], n_layers=2,
                                                 n_heads=plan.vision["n_heads"], d_ff=plan.vision["d_ff"]), embed_dim=128)).to(device)
    clip_tc = CLIPTrainConfig(steps=plan.steps_clip, batch_size=plan.clip_batch_size, lr=plan.lr, n_range=plan.n_train,
                              image_size=plan.image_size, workers=plan.workers, log_every=100)
    clip_res = train_clip(clip, tok, clip_tc, log=log)

    # 2. LM warm-up on scene text
    lm = Transformer(ModelConfig(vocab_size=vocab, **plan.text)).to(device)
    lm_res = warmup_lm(lm, tok, plan.steps_lm, data, lr=plan.lr, log=log, log_every=100)
    shared_s = time.perf_counter() - t_start

    # 3. per fusion mode: align, then joint, then evaluate
    results, extra = {}, {}
    for mode in args.modes.split(","):
        vlm = build_vlm(plan, mode, tok, clip.vision, lm).to(device)
        stages = [Stage("align", plan.steps_align, plan.lr, ("connector",), Mix(qa=0.0, pair=1.0, caption=1.0, doc=0.5)),
                  Stage("joint", plan.steps_joint, plan.lr, ("connector", "lm", "vision"), Mix(qa=4.0, caption=0.5, multi=0.5, doc=0.25))]
        t0 = time.perf_counter()
        stage_res = [train_stage(vlm, s, tok, data, image_tokens=vlm.cfg.image_tokens, vision_cfg=vlm.cfg.vision, log=log,
                                 log_every=200, metrics_path=str(out / f"{mode}_metrics.jsonl")) for s in stages]
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = eval_vqa(vlm, tok, plan.n_eval, plan.per_type, batch_size=256 if device.type == "cuda" else 64, log=log)
        eval_s = time.perf_counter() - t0
        results[mode] = res
        n_params = sum(p.numel() for p in vlm.parameters())
        extra[mode] = {"params": f"{n_params / 1e6:.1f}M", "image tokens in text": vlm.cfg.image_tokens,
                       "train": f"{train_s:.0f}s", "eval": f"{eval_s:.0f}s",
                       "final loss": f"{stage_res[-1]['loss']:.3f}", "target met": target_met(res)}
        save_vlm(vlm, out / mode, tok, extra={"train": stage_res})
        (out / f"{mode}_eval.json").write_text(json.dumps(res, indent=2))

    total = time.perf_counter() - t_start
    table = format_table(results, extra)
    print(f"\nShapeBind held-out accuracy (%), exact match, {plan.per_type} questions per cell; "
          f"same encoder init, data and steps ({plan.steps_align} align + {plan.steps_joint} joint, batch {plan.batch_size})")
    print(table)
    print(f"\nshared: CLIP {clip_res['seconds']:.0f}s (held-out retrieval top-1 {clip_res['retrieval_top1']:.3f}), "
          f"LM warm-up {lm_res['seconds']:.0f}s; total {total:.0f}s on {device}")
    summary = {"plan": asdict(plan), "clip": clip_res, "lm": lm_res, "results": results, "extra": extra, "total_s": total,
               "shared_s": shared_s, "device": str(device), "torch": torch.__version__}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "table.txt").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
