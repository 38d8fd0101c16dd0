"""Where a ShapeBind VLM training step's time goes, and what makes it faster (issue 5: more steps per budget).

The GPU runs (benchmarks/RESULTS.md, Vision) train cross fusion at ~12 steps/s and inline at ~18 steps/s at batch
128, for a model of 30M parameters: far below what the GPU could do. This measures, in one process:
- data: batches/s that SampleStream delivers with the recipe's DataLoader workers (is the input the limit?);
- the step on batches already on the device (train_stage's forward_loss, backward, clip, AdamW): eager as
  train_stage does it (a host sync on the gradient norm each step), eager without that sync, block by block with
  torch.compile as train_stage does it for Stage(compile=True) ("compile": omnigpt.train.vlm.compiled_blocks, dynamic
  shapes), and the whole model through torch.compile ("compile_whole"), each as steps/s and a ratio to the first. With
  --batches K the steps cycle through K different batches (lengths and image counts differ, as in training); the
  warm-up runs each once, so the compile variant's warm-up time is what its compiles and recompiles cost;
- with --profile: GPU kernel time per step against wall time per step (how idle the GPU is).

    PYTHONPATH=. python3 benchmarks/vlm_step.py --profile            # the GPU run (~3-4 minutes)
    PYTHONPATH=. python3 benchmarks/vlm_step.py --modes cross --variants eager,compile --batches 8
    python benchmarks/vlm_step.py --quick --steps 3 --threads 2      # CPU check of the script
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import traceback
import zlib
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnigpt.config import ModelConfig  # noqa: E402
from omnigpt.data.vision_samples import SampleStream, ScenePool, batches, shapebind_tokenizer  # noqa: E402
from omnigpt.model.transformer import Transformer  # noqa: E402
from omnigpt.model.vision import ViT, VisionConfig  # noqa: E402
from omnigpt.train.vlm import (Recipe, autocast_for, build_vlm, compiled_blocks, forward_loss, quick_recipe,  # noqa: E402
                               stage_optimizer, vlm_stages)


def data_rate(stream, workers: int, n: int) -> float:
    it = batches(stream, workers)
    next(it)  # workers started
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return n / (time.perf_counter() - t0)


def time_steps(vlm, batches_, stage, *, steps: int, sync_each_step: bool, compiled: str = "", device) -> dict:
    """{steps_per_s, loss (the last), warmup_s}: `steps` training steps cycling through `batches_`, after a warm-up
    of one step per batch (compiled, "blocks" or "whole": twice, so that recompiles happen before the timing)."""
    with contextlib.ExitStack() as stack:
        if compiled == "blocks":
            stack.enter_context(compiled_blocks(vlm))
        model = torch.compile(vlm, dynamic=True) if compiled == "whole" else vlm
        return _time_steps(vlm, model, batches_, stage, steps=steps, sync_each_step=sync_each_step,
                           warmup_rounds=2 if compiled else 1, device=device)


def _time_steps(vlm, model, batches_, stage, *, steps, sync_each_step, warmup_rounds, device) -> dict:
    opt = stage_optimizer(vlm, stage.lr, stage.vision_lr_scale)
    params = [p for p in vlm.parameters() if p.requires_grad]
    autocast = autocast_for(device)

    def step(batch):
        with autocast:
            loss, _, _ = forward_loss(model, batch, vlm.cfg.vision, stage.ground_weight)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if sync_each_step:
            if math.isfinite(float(gnorm)):
                opt.step()
        else:  # the skip decision on the device: no host sync inside the step
            finite = torch.isfinite(gnorm)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(finite)
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for batch in batches_ * warmup_rounds + batches_[:2]:  # compile, recompile and autotune outside the timing
        step(batch)
    sync(device)
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(batches_[i % len(batches_)])
    sync(device)
    return {"steps_per_s": steps / (time.perf_counter() - t0), "loss": float(loss.detach()), "warmup_s": warmup}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def gpu_busy(vlm, batch, stage, device, steps: int = 10, top: int = 0) -> dict:
    """Kernel time per step (sum of CUDA kernel durations) against wall time per step, eager with sync."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    time_steps(vlm, [batch], stage, steps=2, sync_each_step=True, device=device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        time_steps(vlm, [batch], stage, steps=steps, sync_each_step=True, device=device)
        wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"] if device.type == "cuda" else []
    if top:  # the ops whose kernels take the most GPU time
        print(prof.key_averages().table(sort_by="self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total",
                                        row_limit=top, max_name_column_width=60), flush=True)
    kernel_us = sum(e.self_device_time_total for e in events)
    n_kernels = sum(e.count for e in events)
    return {"wall_ms_per_step_incl_warmup": 1e3 * wall / (steps + 3), "kernel_ms_per_step": kernel_us / 1e3 / (steps + 3),
            "kernels_per_step": n_kernels / (steps + 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--modes", default="cross,inline")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--variants", default="eager,nosync,compile,compile_whole")
    ap.add_argument("--batches", type=int, default=1, help="cycle through this many different batches")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--top", type=int, default=0, help="with --profile: print the K ops with the most GPU time")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default="")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = (quick_recipe() if args.quick else Recipe()).override(args.set)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}", flush=True)
    tok = shapebind_tokenizer()
    pool = ScenePool(min(recipe.pool_scenes, 4000), recipe.n_train, recipe.image_size, "pool", workers=recipe.workers)
    vision = ViT(VisionConfig(image_size=recipe.image_size, pool="mean", **recipe.vision)).to(device)
    lm = Transformer(ModelConfig(vocab_size=tok.padded_vocab_size(), **recipe.text)).to(device)
    rows = []
    for mode in args.modes.split(","):
        torch.manual_seed(0)
        vlm = build_vlm(recipe, mode, tok, vision, lm).to(device)
        stage = vlm_stages(recipe, mode)[-1]  # the joint stage: what the budget is spent on
        vlm.set_trainable(stage.parts)
        vlm.train()
        ground_grid = (vlm.cfg.ground_grid or 0) if stage.mix.ground else 0
        stream = SampleStream(tok, vlm.cfg.image_tokens, stage.mix, recipe.batch_size, seed=zlib.crc32(b"bench"),
                              n_range=recipe.n_train, image_size=recipe.image_size, pool=pool, ground_grid=ground_grid,
                              max_len=recipe.text["max_seq_len"] + 1)
        rate = data_rate(stream, recipe.workers, 20 if not args.quick else 2)
        source = iter(stream)
        batches_ = [next(source).to(device) for _ in range(args.batches)]
        batch = batches_[0]
        row = {"mode": mode, "batch": recipe.batch_size, "T": [b.inputs.shape[1] for b in batches_],
               "images": [len(b.images) for b in batches_], "data_batches_per_s": round(rate, 1), "workers": recipe.workers}
        print(f"{mode}: data {rate:.1f} batches/s with {recipe.workers} workers; batches T={row['T']}, images {row['images']}", flush=True)
        base = None
        for variant in args.variants.split(","):
            try:
                graphs = counters["stats"]["unique_graphs"]
                r = time_steps(vlm, batches_, stage, steps=args.steps, sync_each_step=variant == "eager",
                               compiled={"compile": "blocks", "compile_whole": "whole"}.get(variant, ""), device=device)
            except Exception as e:  # a variant that fails is reported, the others still run
                print(f"  {variant}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                traceback.print_exc()  # what failed where: the next run's starting point
                row[variant] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                continue
            sps = r["steps_per_s"]
            base = base or sps
            row[variant] = {"steps_per_s": round(sps, 2), "x_eager": round(sps / base, 2), "loss": round(r["loss"], 4),
                            "warmup_s": round(r["warmup_s"], 1), "graphs": counters["stats"]["unique_graphs"] - graphs}
            print(f"  {variant}: {sps:.2f} steps/s ({sps / base:.2f}x), loss {r['loss']:.4f}, warm-up {r['warmup_s']:.1f}s, "
                  f"{row[variant]['graphs']} graphs compiled", flush=True)
        if args.profile:
            row["profile"] = gpu_busy(vlm, batch, stage, device, top=args.top)
            print(f"  profile: {json.dumps(row['profile'])}", flush=True)
        rows.append(row)
        del vlm
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "torch": torch.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
