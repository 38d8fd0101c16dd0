"""What every alignment trainer shares: processes, the run folder, resume, the LR schedule, metrics, checkpoints.

Each trainer (sft.py, reward.py, dpo.py, ppo.py, grpo.py) writes its own explicit loop around a `Run`:

    run = Run("dpo", tc, resume)
    model = run.prepare(model)                  # to the device; FSDP2 when launched under torchrun
    opt = run.optimizer(model)
    state = run.restore(model, opt, cfg)        # {} for a fresh run, else the checkpoint's train state
    while run.step < tc.steps:
        run.set_lr(opt); loss = ...; run.update(loss, opt, params); record = run.reduce({...})
        run.log(record); run.maybe_checkpoint(model, opt, cfg, {...})
    run.export(model, cfg, tok, {...})          # OUT/model: a model folder the next stage loads

Parallelism, optimizer, schedule, gradient clipping and checkpoints are the pretraining ones
(omnigpt.train.parallelize, .optim, .checkpoint): alignment runs launch under torchrun and resume exactly like
`omnigpt train`. A checkpoint's model is whatever module the trainer passes (PPO passes policy + value together).
Data order is a function of the step (omnigpt.align.data.batch_indices) and the RNG states are in the checkpoint,
so the step after a resume is the step the uninterrupted run would have taken.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from omnigpt.train import checkpoint as ckpt
from omnigpt.train.metrics import MetricsLog
from omnigpt.train.optim import build_optimizer, lr_factor, set_lr
from omnigpt.train.parallelize import (
    DistInfo, all_reduce_sum, barrier, clip_grad_norm, full_model_state, init_distributed, parallelize, uses_autocast,
)

from omnigpt.align.config import AlignConfig
from omnigpt.align.modeling import export_model


def say(info: DistInfo, *msg) -> None:
    if info.is_main:
        print(*msg, flush=True)


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


class Run:
    def __init__(self, kind: str, tc: AlignConfig, resume: bool = False, info: DistInfo | None = None):
        tc.validate()
        self.kind, self.tc = kind, tc
        self.info = info or init_distributed(tc.device)
        self.device = self.info.device
        self.out = Path(tc.out_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=self.info.is_main)
        self.found = ckpt.latest_checkpoint(self.ckpt_root)
        if self.found is not None and not resume:
            raise ValueError(f"{self.out} already has checkpoints ({self.found.name}); pass --resume to continue, or choose another --out")
        self.step = 0
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if uses_autocast(self.info) else contextlib.nullcontext
        self.t_start = time.perf_counter()
        torch.manual_seed(tc.seed)  # fresh heads start identical on every rank

    def say(self, *msg) -> None:
        say(self.info, *msg)

    # -- models and optimizer
    def prepare(self, model: nn.Module, trainable: bool = True) -> nn.Module:
        model = model.to(self.device)
        if not trainable:
            model.requires_grad_(False)
        model.train(trainable)
        return parallelize(model, self.info)

    def optimizer(self, model: nn.Module):
        tc = self.tc
        return build_optimizer(model, "adamw", lr=tc.lr, weight_decay=tc.weight_decay, betas=(tc.beta1, tc.beta2))

    def restore(self, model: nn.Module, optimizer, cfg) -> dict:
        """Continue from the latest checkpoint (returns its train state), or start fresh (returns {})."""
        if self.found is None:
            self.metrics.reset()
            torch.manual_seed(self.tc.seed * 1_000_003 + 7 * self.info.rank + 1)  # each rank samples its own stream
            return {}
        state = ckpt.load_checkpoint(self.found, model=model, optimizer=optimizer, cfg=cfg, info=self.info)
        if state.get("kind") != self.kind:
            raise ValueError(f"checkpoint {self.found} is from `align {state.get('kind')}`, not `align {self.kind}`")
        self.step = int(state["step"])
        self.metrics.truncate_after(self.step)
        self.say(f"resumed from {self.found} at step {self.step}")
        return state

    # -- a step
    def set_lr(self, optimizer) -> float:
        tc = self.tc
        f = lr_factor(self.step, tc.steps, tc.warmup_steps, tc.schedule, tc.min_lr_ratio)
        set_lr(optimizer, f)
        return tc.lr * f

    def update(self, loss: torch.Tensor, optimizer, params) -> float:
        """backward, clip, optimizer step; returns the gradient norm before clipping."""
        loss.backward()
        norm = clip_grad_norm(params, self.tc.grad_clip, self.info)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def reduce(self, values: dict, op: str = "mean") -> dict[str, float]:
        """Floats (or scalar tensors) averaged (or summed) over ranks, in one all-reduce."""
        keys = list(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        all_reduce_sum(t, self.info)
        if op == "mean":
            t /= self.info.world_size
        return dict(zip(keys, t.tolist()))

    def due(self, every: int) -> bool:
        return (every > 0 and self.step % every == 0) or self.step == self.tc.steps

    # -- bookkeeping
    def log(self, record: dict) -> dict:
        record = {"step": self.step, **record, "elapsed": round(time.perf_counter() - self.t_start, 3)}
        for k, v in record.items():
            if isinstance(v, float) and not math.isfinite(v) and k in ("loss",):
                raise FloatingPointError(f"{k} is {v} at step {self.step}; lower --lr or check the data")
        self.metrics.write(record)
        if self.step == 1 or self.due(self.tc.log_every) or any(k.startswith("val") for k in record):
            shown = " | ".join(f"{k} {fmt(v)}" for k, v in record.items() if k not in ("step", "elapsed"))
            self.say(f"{self.kind} step {self.step:>{len(str(self.tc.steps))}}/{self.tc.steps} | {shown}")
        return record

    def maybe_checkpoint(self, model: nn.Module, optimizer, cfg, extra: dict | None = None) -> None:
        if not self.due(self.tc.ckpt_every):
            return
        state = {"kind": self.kind, "train_config": asdict(self.tc), **(extra or {})}
        path = ckpt.save_checkpoint(self.ckpt_root, self.step, model=model, optimizer=optimizer, cfg=cfg, train_state=state,
                                    info=self.info, keep=self.tc.keep_checkpoints)
        self.say(f"{self.kind} step {self.step}: checkpoint {path}")

    def export(self, model: nn.Module, cfg, tok, align: dict, name: str = "model") -> Path:
        """OUT/<name>: the trained model as a plain model folder (gathered from FSDP shards), with the tokenizer."""
        state = full_model_state(model, self.info)
        path = self.out / name
        if self.info.is_main:
            export_model(state, cfg, path, tok, align)
            self.say(f"{self.kind}: wrote {path}")
        barrier(self.info)
        return path
