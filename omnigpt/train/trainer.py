"""The pretraining loop: a plain loop over optimizer steps, nothing hidden.

    for step in steps:
        lr = schedule(step)
        for micro in grad_accum: loss = model(batch) / grad_accum; loss.backward()
        clip; optimizer.step(); zero_grad
        every log_every: one progress line + a JSONL record;  every val_every: validation loss
        every ckpt_every: checkpoint (exact resume point)

Batch sizes: `batch_size` rows of `seq_len` tokens per rank per micro-step; one optimizer step sees
batch_size * grad_accum * world_size rows (the global batch). The data order depends only on the global row
index (see omnigpt.data.packing), so 2 ranks with batch 2 train on exactly what 1 rank with batch 4 trains on.

Precision: float32 on CPU; bf16 autocast on one GPU; with FSDP on GPUs the FSDP mixed-precision policy (bf16
parameters, float32 gradient reduction) replaces autocast. Weights and optimizer state stay float32.

Exact resume: the checkpoint holds model, optimizer, schedule step, data position and RNG states; the loop has
no other state (the schedule is a function of the step, the loader's position is a handful of integers), so on
CPU in float32 a resumed run repeats the uninterrupted run's losses bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from omnigpt.config import ModelConfig
from omnigpt.data.packing import IGNORE, PackedLoader, eval_batches
from omnigpt.model.transformer import Transformer
from omnigpt.train import checkpoint as ckpt
from omnigpt.train.metrics import MetricsLog, peak_flops, plot_losses, progress_line
from omnigpt.train.optim import build_optimizer, lr_factor, set_lr
from omnigpt.train.parallelize import DistInfo, all_reduce_sum, clip_grad_norm, init_distributed, parallelize, uses_autocast


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    steps: int = 1000
    batch_size: int = 8  # rows per rank per micro-step
    seq_len: int = 256
    grad_accum: int = 1
    # optimisation
    optimizer: str = "adamw"  # adamw | muon (Muon for block matrices, AdamW for the rest)
    lr: float = 3e-3  # AdamW learning rate
    muon_lr: float = 0.02
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # <= 0: no clipping (the norm is still logged)
    schedule: str = "cosine"  # cosine | wsd
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    decay_frac: float = 0.2  # wsd: the last fraction of steps that decays
    # data
    seed: int = 0
    weights: list[float] | None = None  # mixture weights of the training sources (None: equal token shares)
    doc_mask: bool = True  # attention stays inside each packed document
    piece_rows: int = 8  # documents longer than this many rows are cut into pieces drawn apart (0: whole documents)
    tokenizer_sha256: str | None = None  # of the corpus tokenizer: a resume on shards of another tokenizer stops
    # bookkeeping
    log_every: int = 10
    val_every: int = 200  # 0: only at the end
    val_batches: int = 16  # per validation source (global micro-batches)
    ckpt_every: int = 200  # 0: only at the end
    keep_checkpoints: int = 3
    plot: bool = True
    # systems
    device: str | None = None  # cpu | cuda | None (cuda when available)
    compile: bool = False
    expert_parallel: bool = False
    max_minutes: float | None = None  # stop after this much wall time with a checkpoint (a resumable stage)
    debug_step_sleep: float = 0.0  # tests: slow each step down so a process can be killed mid-run

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"--schedule must be cosine or wsd, got {self.schedule!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"--optimizer must be adamw or muon, got {self.optimizer!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainData:
    """Sources as omnigpt.data.packing understands them (ListSource, ShardSource)."""

    train: list
    val: list = field(default_factory=list)


# ---- pieces of the loop ----------------------------------------------------------------------------------------
def forward_loss(model, batch, tc: TrainConfig, autocast):
    with autocast():
        if tc.doc_mask:
            return model(batch.inputs, batch.targets, doc_ids_BT=batch.doc_ids, pos_BT=batch.pos)
        return model(batch.inputs, batch.targets)


@torch.no_grad()
def evaluate(model, sources, tc: TrainConfig, info: DistInfo, autocast) -> dict[str, float]:
    """Mean validation loss (nats/token) per source and over all their tokens ("val_loss")."""
    model.eval()
    out, total = {}, torch.zeros(2, dtype=torch.float64, device=info.device)
    for src in sources:
        acc = torch.zeros(2, dtype=torch.float64, device=info.device)  # (sum of losses, number of targets)
        for batch in eval_batches(src, tc.seq_len, tc.batch_size, rank=info.rank, world_size=info.world_size, max_batches=tc.val_batches):
            batch = batch.to(info.device, non_blocking=True)
            with autocast():
                kw = dict(doc_ids_BT=batch.doc_ids, pos_BT=batch.pos) if tc.doc_mask else {}
                logits = model(batch.inputs, **kw).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="sum")
            acc += torch.stack([loss.double(), (batch.targets != IGNORE).sum().double()])
        all_reduce_sum(acc, info)
        total += acc
        if acc[1] > 0:
            out[f"val/{src.name}"] = (acc[0] / acc[1]).item()
    if total[1] > 0:
        out["val_loss"] = (total[0] / total[1]).item()
    model.train()
    return out


def say(info: DistInfo, *msg) -> None:
    if info.is_main:
        print(*msg, flush=True)


# ---- the loop --------------------------------------------------------------------------------------------------
def train(cfg: ModelConfig, tc: TrainConfig, data: TrainData, *, resume: bool = False, info: DistInfo | None = None) -> dict:
    """Train (or continue training) `cfg` on `data`; returns the last metrics. Call under torchrun for several
    ranks (the process group is started here from the environment)."""
    tc.validate()
    info = info or init_distributed(tc.device)
    out = Path(tc.out_dir)
    ckpt_root = out / "checkpoints"
    metrics = MetricsLog(out / "metrics.jsonl", enabled=info.is_main)
    found = ckpt.latest_checkpoint(ckpt_root)
    if found is not None and not resume:
        raise ValueError(f"{out} already has checkpoints ({found.name}); pass --resume to continue, or choose another --out")

    # Model: the same seed on every rank gives the same initial weights; FSDP then keeps each rank's shard.
    torch.manual_seed(tc.seed)
    model = Transformer(cfg).to(info.device)
    model.train()
    parallelize(model, info, expert_parallel=tc.expert_parallel, compile=tc.compile)
    optimizer = build_optimizer(model, tc.optimizer, lr=tc.lr, weight_decay=tc.weight_decay, betas=(tc.beta1, tc.beta2), muon_lr=tc.muon_lr)
    params = [p for p in model.parameters() if p.requires_grad]
    loader = PackedLoader(data.train, tc.seq_len, tc.batch_size, weights=tc.weights, seed=tc.seed, rank=info.rank,
                          world_size=info.world_size, piece_len=tc.piece_rows * tc.seq_len or None)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if uses_autocast(info) else contextlib.nullcontext

    step, tokens, elapsed_before = 0, 0, 0.0
    if found is not None:
        state = ckpt.load_checkpoint(found, model=model, optimizer=optimizer, cfg=cfg, info=info)
        if state["train_config"]["optimizer"] != tc.optimizer:
            raise ValueError(f"checkpoint {found} was trained with --optimizer {state['train_config']['optimizer']}, this run has {tc.optimizer}")
        saved_tok = state["train_config"].get("tokenizer_sha256")
        if saved_tok and tc.tokenizer_sha256 and saved_tok != tc.tokenizer_sha256:
            raise ValueError(f"checkpoint {found} was trained on shards of another tokenizer (sha256 {saved_tok[:12]}, "
                             f"--data has {tc.tokenizer_sha256[:12]})")
        loader.load_state_dict(state["loader"])
        step, tokens, elapsed_before = state["step"], state["tokens"], state.get("elapsed", 0.0)
        metrics.truncate_after(step)
        say(info, f"resumed from {found} at step {step} ({tokens:,} tokens)")
    else:
        if resume:
            say(info, f"no checkpoint in {ckpt_root}; starting from scratch")
        metrics.reset()

    rows_per_step = tc.batch_size * tc.grad_accum * info.world_size
    tokens_per_step = rows_per_step * tc.seq_len
    flops_per_token = cfg.flops_per_token(tc.seq_len)
    peak = peak_flops(info.device)
    say(info, f"model {cfg.param_counts()['total']:,} parameters ({cfg.param_counts()['active']:,} active); "
              f"{info.world_size} rank(s) on {info.device.type}; global batch {rows_per_step} x {tc.seq_len} = {tokens_per_step:,} tokens; "
              f"{tc.steps} steps = {tc.steps * tokens_per_step:,} tokens; optimizer {tc.optimizer}, schedule {tc.schedule}")

    def train_state() -> dict:
        return {"tokens": tokens, "loader": loader.state_dict(), "train_config": asdict(tc), "elapsed": elapsed_before + time.perf_counter() - t_start,
                "schedule": {"kind": tc.schedule, "step": step, "total": tc.steps, "warmup": tc.warmup_steps}}

    def validate_now() -> dict:
        if not data.val:
            return {}
        res = evaluate(model, data.val, tc, info, autocast)
        metrics.write({"step": step, "tokens": tokens, **res})
        say(info, f"step {step}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
        return res

    t_start = t_log = time.perf_counter()
    start_step, log_loss, log_aux, log_steps = step, torch.zeros((), device=info.device), torch.zeros((), device=info.device), 0
    last = {}
    while step < tc.steps:
        lr_mult = lr_factor(step, tc.steps, tc.warmup_steps, tc.schedule, tc.min_lr_ratio, tc.decay_frac)
        set_lr(optimizer, lr_mult)
        for _ in range(tc.grad_accum):
            batch = next(loader).to(info.device, non_blocking=True)
            res = forward_loss(model, batch, tc, autocast)
            (res.loss / tc.grad_accum).backward()
            log_loss += res.lm_loss.detach() / tc.grad_accum
            if res.aux_loss is not None:
                log_aux += res.aux_loss.detach() / tc.grad_accum
        grad_norm = clip_grad_norm(params, tc.grad_clip, info)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += tokens_per_step
        log_steps += 1
        if tc.debug_step_sleep:
            time.sleep(tc.debug_step_sleep)

        if step % tc.log_every == 0 or step == tc.steps:
            sums = all_reduce_sum(torch.stack([log_loss, log_aux]), info) / (info.world_size * log_steps)
            loss, aux = sums.tolist()  # the one host sync per log interval
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}; lower --lr or check the data")
            now = time.perf_counter()
            tok_s = tokens_per_step * log_steps / (now - t_log)
            mfu = flops_per_token * tok_s / (peak * info.world_size) if peak else None
            eta = (now - t_start) / (step - start_step) * (tc.steps - step)
            lr_now = tc.lr * lr_mult
            last = {"step": step, "tokens": tokens, "loss": loss, "lr": lr_now, "grad_norm": grad_norm.item(), "tok_per_s": tok_s,
                    "mfu": mfu, "elapsed": elapsed_before + now - t_start}
            if cfg.n_experts:
                last["aux_loss"] = aux
            metrics.write(last)
            say(info, progress_line(step, tc.steps, loss, lr_now, last["grad_norm"], tok_s, mfu, eta, aux if cfg.n_experts else None))
            log_loss.zero_(), log_aux.zero_()
            log_steps, t_log = 0, time.perf_counter()

        if (tc.val_every and step % tc.val_every == 0) or step == tc.steps:
            last.update(validate_now())
            if info.is_main and tc.plot:
                plot_losses(metrics.read(), out / "loss.png", title=f"{out.name}")
            t_log = time.perf_counter()  # validation time is not training throughput
        out_of_time = False
        if tc.max_minutes is not None and step % tc.log_every == 0:  # every rank asks at the same steps and agrees
            late = torch.tensor(float(time.perf_counter() - t_start > 60 * tc.max_minutes), device=info.device)
            out_of_time = all_reduce_sum(late, info).item() > 0
        if (tc.ckpt_every and step % tc.ckpt_every == 0) or step == tc.steps or out_of_time:
            path = ckpt.save_checkpoint(ckpt_root, step, model=model, optimizer=optimizer, cfg=cfg, train_state=train_state(),
                                        info=info, keep=tc.keep_checkpoints)
            say(info, f"step {step}: checkpoint {path}")
            t_log = time.perf_counter()
        if out_of_time and step < tc.steps:
            say(info, f"stage time of {tc.max_minutes} min used at step {step} of {tc.steps}; run again with --resume to continue")
            break
    if step == start_step:
        say(info, f"already at step {step} of {tc.steps}; nothing to do")
    return last
