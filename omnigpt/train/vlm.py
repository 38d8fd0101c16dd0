"""Staged training of a vision-language model on ShapeBind, and the whole recipe from scratch.

A stage trains some parts of the model on a mixture of sample kinds (omnigpt.data.vision_samples.Mix):
    warmup  the LM alone on scene text (captions, questions with answers), no images;
    align   connector alignment: only the connector (+ resampler and gated cross-attention blocks) learns, the
            vision encoder and the LM are frozen; image-caption documents and captions;
    joint   joint fine-tuning of the listed parts on questions, captions, two-image turns, documents (with
            Recipe.curriculum_n, preceded by "joint_few": the same on scenes of few objects).
Each stage has its own AdamW (omnigpt.train.optim) with linear warmup and cosine decay to 10%, over a number of
steps or over a time budget (then the schedule follows elapsed time, and two models given the same budget get the
same GPU time: "the same compute"). Loss: mean over samples of each sample's mean token loss, so that a one-word
answer weighs as much as a long caption. bf16 autocast on CUDA.

The recipe (`Recipe`, `run_recipe`): ShapeBind BPE -> scene pool -> CLIP pre-training of the ViT -> (optional LM
warm-up) -> per fusion mode a VLM from copies of that ViT and LM -> align -> joint -> held-out VQA evaluation.
What CPU experiments at toy scale showed (benchmarks/vision_shapebind.py has the details): without CLIP
pre-training a ViT trained through the LM does not ground answers in the image within thousands of steps; the
vision tower is fine-tuned at 0.1x the learning rate; questions come before the image in the user turn.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import traceback
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from omnigpt.data.vision_samples import IGNORE, Mix, SampleStream, batches
from omnigpt.model.multimodal import VLM, VLMConfig
from omnigpt.model.vision import normalize
from omnigpt.train.optim import set_lr


@dataclass
class Stage:
    name: str
    steps: int  # the most steps (with budget_s: the stage may stop earlier)
    lr: float
    parts: tuple[str, ...]  # trainable: vision, connector, lm (a plain Transformer trains whole)
    mix: Mix = field(default_factory=Mix)
    warmup: int = 20
    budget_s: float | None = None  # train for this many seconds instead of exactly `steps`
    vision_lr_scale: float = 1.0  # the vision tower's learning rate is lr * this (pre-trained features drift less)
    ground_weight: float = 0.0  # loss += this * the grounding loss (needs mix.ground and a VLM with ground_layer set)
    compile: bool = False  # each block through torch.compile (compiled_blocks); its compile time counts in budget_s
    n_range: tuple[int, int] | None = None  # scenes of this many objects (None: DataConfig.n_range)
    schedule: tuple[float, float] = (0.0, 1.0)  # the span of one cosine schedule this stage runs (its share of a split stage)


@dataclass
class DataConfig:
    batch_size: int = 32
    n_range: tuple[int, int] = (1, 16)
    image_size: int = 128
    workers: int = 0  # DataLoader processes assembling batches (0: in the training process)
    seed: int = 0
    max_len: int | None = None  # skip samples longer than this many tokens


ALIGN_MIX = Mix(qa=0.0, pair=1.0, caption=1.0, doc=0.5)
JOINT_MIX = Mix(qa=4.0, caption=0.5, multi=0.5, doc=0.25, max_turns=2)


# ---- pieces ----------------------------------------------------------------------------------------------------
def autocast_for(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def lr_at(step: int, progress: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Cosine from 1 to min_ratio as progress goes 0 -> 1, ramped up linearly over the first `warmup` steps."""
    ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
    return ramp * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Clock:
    """How far a stage is: steps done / steps, or seconds spent / budget."""

    def __init__(self, steps: int, budget_s: float | None = None):
        self.steps, self.budget_s, self.t0 = steps, budget_s, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def progress(self, step: int) -> float:
        by_steps = step / max(1, self.steps)
        return max(by_steps, self.elapsed() / self.budget_s) if self.budget_s else by_steps

    def done(self, step: int) -> bool:
        return step >= self.steps or (self.budget_s is not None and self.elapsed() >= self.budget_s)


def stage_optimizer(model: torch.nn.Module, lr: float, vision_lr_scale: float = 1.0, weight_decay: float = 0.0):
    """AdamW over the trainable parameters; the vision tower's at lr * vision_lr_scale. Every group has `base_lr`
    (omnigpt.train.optim.set_lr scales it); weight decay only on matrices."""
    vision = {id(p) for p in model.vision.parameters()} if isinstance(model, VLM) else set()
    groups = []
    for is_vision in (False, True):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in vision) == is_vision]
        group_lr = lr * (vision_lr_scale if is_vision else 1.0)
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim >= 2) == decay]
            if chosen:
                groups.append(dict(params=chosen, lr=group_lr, base_lr=group_lr, weight_decay=weight_decay if decay else 0.0))
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), **(dict(fused=True) if fused else dict(foreach=True)))


def sample_losses(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """(B,) each sample's mean token loss; NaN for a sample with nothing to learn."""
    B, T = targets_BT.shape
    loss_BT = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), ignore_index=IGNORE, reduction="none").view(B, T)
    return loss_BT.sum(1) / (targets_BT != IGNORE).sum(1)


def loss_by_kind(loss_B: torch.Tensor, kinds: list[str]) -> dict[str, float]:
    """{kind: mean loss of the batch's samples of that kind} (VLBatch.kinds: "qa:color", "caption", ...): one answer
    type the model cannot learn (e.g. colour stuck at ln 8 while the rest falls) shows here, not in the mean."""
    sums: dict[str, list[float]] = {}
    for kind, loss in zip(kinds, loss_B.tolist()):
        if not math.isnan(loss):
            sums.setdefault(kind, []).append(loss)
    return {k: sum(v) / len(v) for k, v in sorted(sums.items())}


def forward_loss(model, batch, vision_cfg, ground_weight: float = 0.0):
    """(the loss to minimise, the grounding loss in it or None, each sample's answer loss (B,), detached): answer
    loss + ground_weight x grounding loss. `model` may be torch.compile'd (an OptimizedModule around the VLM)."""
    if isinstance(getattr(model, "_orig_mod", model), VLM):
        pixels = normalize(batch.images, vision_cfg) if len(batch.images) else None
        ground = batch.ground if ground_weight > 0 else None
        out = model(batch.inputs, None, pixels, ground=ground)
    else:
        out, ground = model(batch.inputs), None
    loss_B = sample_losses(out.logits, batch.targets)
    loss = loss_B[~loss_B.isnan()].mean()
    if ground is not None:
        return loss + ground_weight * out.ground_loss, out.ground_loss, loss_B.detach()
    return loss, None, loss_B.detach()


@contextlib.contextmanager
def compiled_blocks(model: torch.nn.Module):
    """While inside, each block's forward (ViT and LM blocks, gated cross-attention blocks, resampler layers) runs
    through torch.compile with dynamic shapes: every batch has its own length and number of images. Per block, not
    the whole model: blocks of a kind share one graph, the VLM's hooks (cross-attention, grounding, rotary) stay
    eager between them, and the whole-model compile failed in Inductor with dynamic shapes (torch 2.11, H200).
    Parameters and state_dict names are unchanged; on exit the blocks are eager again (evaluation, generation)."""
    from omnigpt.model.multimodal import GatedCrossBlock, ResamplerLayer
    from omnigpt.model.transformer import Block as LMBlock
    from omnigpt.model.vision import Block as ViTBlock

    blocks = [m for m in model.modules() if isinstance(m, (ViTBlock, LMBlock, GatedCrossBlock, ResamplerLayer))]
    for m in blocks:
        m.forward = torch.compile(m.forward, dynamic=True)  # an instance attribute over the class's method
    try:
        yield blocks
    finally:
        for m in blocks:
            del m.forward


def is_compile_error(e: BaseException) -> bool:
    """Whether an exception comes from torch.compile (Dynamo, AOTAutograd, Inductor, or the Triton kernels it
    generated, e.g. out of shared memory), not from the model."""
    return type(e).__module__.startswith(("torch._dynamo", "torch._inductor", "torch._functorch", "torch.fx", "triton"))


def train_stage(model: torch.nn.Module, stage: Stage, tok, data: DataConfig, *, image_tokens: int = 1, vision_cfg=None,
                log=print, log_every: int = 50, grad_clip: float = 1.0, weight_decay: float = 0.0,
                metrics_path: str | None = None, pool=None) -> dict:
    """Train one stage; returns {"stage", "steps", "loss" (mean of the last logged 10%), "seconds", ...}. With
    stage.compile, a compile that fails is logged with its traceback and the stage goes on eagerly."""
    device = model_device(model)
    if isinstance(model, VLM):
        model.set_trainable(stage.parts)
    else:
        model.requires_grad_(True)
    model.train()
    opt = stage_optimizer(model, stage.lr, stage.vision_lr_scale, weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    ground_grid = (model.cfg.ground_grid or 0) if isinstance(model, VLM) and stage.mix.ground else 0
    mix = stage.mix
    if isinstance(model, VLM):  # the layout and labels this model was built for
        mix = replace(mix, image_first=model.cfg.image_first, mentions=model.cfg.pointer != "answer")
    stream = SampleStream(tok, image_tokens, mix, data.batch_size, seed=zlib.crc32(f"{data.seed}:{stage.name}".encode()),
                          n_range=stage.n_range or data.n_range, image_size=data.image_size, max_len=data.max_len, pool=pool,
                          ground_grid=ground_grid)
    it = batches(stream, data.workers)
    autocast = autocast_for(device)
    compiled, compile = contextlib.ExitStack(), stage.compile
    if compile:
        compiled.enter_context(compiled_blocks(model))
    metrics = open(metrics_path, "a") if metrics_path else None
    losses: list[tuple[float, float]] = []  # (progress, loss) every 10 steps
    clock, step = Clock(stage.steps, stage.budget_s), 0
    skipped = bad_run = 0  # steps whose gradients were not finite, in all and in a row
    warmup = min(stage.warmup, stage.steps // 5)  # also where a stage goes on from another's schedule: a new AdamW
    start, end = stage.schedule

    def forward_backward(batch):
        with autocast:
            loss, ground_loss, loss_B = forward_loss(model, batch, vision_cfg, stage.ground_weight)
        loss.backward()
        return loss, ground_loss, loss_B

    while not clock.done(step):
        set_lr(opt, lr_at(step, start + (end - start) * clock.progress(step), warmup))
        batch = next(it).to(device)
        try:
            loss, ground_loss, loss_B = forward_backward(batch)
        except Exception as e:  # noqa: BLE001 - only a compiler's failure is retried, eagerly
            if not compile or not is_compile_error(e):
                raise
            log(f"[{stage.name}] step {step}: torch.compile failed, the stage goes on eagerly:\n{traceback.format_exc()}")
            compiled.close()
            compile = False
            opt.zero_grad(set_to_none=True)  # a backward that failed halfway may have left some gradients
            loss, ground_loss, loss_B = forward_backward(batch)
        gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        if math.isfinite(float(gnorm)):  # a bf16 overflow skips one step instead of poisoning the weights
            opt.step()
            bad_run = 0
        else:
            skipped, bad_run = skipped + 1, bad_run + 1
            if bad_run == 1:  # where it starts: the parameters whose gradients are not finite
                bad = [n for n, p in model.named_parameters() if p.grad is not None and not bool(p.grad.isfinite().all())]
                log(f"[{stage.name}] step {step}: non-finite gradients (loss {loss.item():.4f}) in {len(bad)} tensors: "
                    f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}")
            if bad_run >= 20:
                raise FloatingPointError(f"[{stage.name}] 20 steps in a row with non-finite gradients at step {step}; "
                                         f"lower the learning rate (now {opt.param_groups[0]['lr']:.2e})")
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 10 == 0 or step == 1:  # .item() waits for the GPU: also keeps the clock honest
            losses.append((clock.progress(step), loss.item()))
        if step % log_every == 0 or step == 1:
            rec = {"stage": stage.name, "step": step, "loss": loss.item(), "grad_norm": float(gnorm),
                   "lr": opt.param_groups[0]["lr"], "seconds": clock.elapsed(), "skipped": skipped}
            if ground_loss is not None:
                rec["ground_loss"] = ground_loss.item()
            rec["loss_by_kind"] = loss_by_kind(loss_B, batch.kinds) if batch.kinds else {}
            qa = {k[3:]: v for k, v in rec["loss_by_kind"].items() if k.startswith("qa:")}
            log(f"[{stage.name}] step {step} loss {rec['loss']:.4f}"
                + (f" (grounding {rec['ground_loss']:.4f})" if ground_loss is not None else "")
                + f" gnorm {rec['grad_norm']:.2f} lr {rec['lr']:.2e} {rec['seconds']:.0f}s ({step / rec['seconds']:.1f} steps/s)"
                + (" | " + " ".join(f"{k} {v:.2f}" for k, v in qa.items()) if qa else ""))
            if metrics:
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
    compiled.close()
    if metrics:
        metrics.close()
    if step == 0:
        return {"stage": stage.name, "steps": 0, "loss": math.nan, "seconds": 0.0, "parts": list(stage.parts), "mix": asdict(stage.mix)}
    tail = [loss for prog, loss in losses if prog >= 0.9] or [loss.item()]
    log(f"[{stage.name}] done: {step} steps in {clock.elapsed():.0f}s, final loss {sum(tail) / len(tail):.4f}"
        + (f", {skipped} steps skipped (non-finite gradients)" if skipped else ""))
    return {"stage": stage.name, "steps": step, "loss": sum(tail) / len(tail), "seconds": clock.elapsed(), "skipped": skipped,
            "parts": list(stage.parts), "mix": asdict(stage.mix)}


def train_vlm(vlm: VLM, tok, stages: list[Stage], data: DataConfig, log=print, **kw) -> list[dict]:
    """Run the stages in order on one VLM."""
    return [train_stage(vlm, s, tok, data, image_tokens=vlm.cfg.image_tokens, vision_cfg=vlm.cfg.vision, log=log, **kw)
            for s in stages]


def warmup_lm(lm: torch.nn.Module, tok, steps: int, data: DataConfig, lr: float = 2e-3, log=print, **kw) -> dict:
    """Language-model warm-up on scene descriptions (no images)."""
    return train_stage(lm, Stage("warmup", steps, lr, ("lm",), Mix(qa=0.0, text=1.0)), tok, data, log=log, **kw)


# ---- the recipe ------------------------------------------------------------------------------------------------
@dataclass
class Recipe:
    """Sizes, steps and budgets of a ShapeBind run. The default is the GPU run that met the target in both fusion
    modes (runs 36-37 in benchmarks/RESULTS.md: one H100, CLIP 150 s once, then ~8.5 minutes per mode);
    `quick_recipe()` is a tiny CPU version."""

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
    lr: float = 1e-3
    cross_lr_scale: float = 0.5  # cross-attention VLM stages at lr * this: at 1e-3 its joint stage diverged (H100, bf16)
    steps_clip: int = 100_000  # with budgets, the step counts are upper bounds
    steps_lm: int = 0  # LM warm-up on scene text (0: none; in short runs it slowed cross-attention grounding)
    steps_align: int = 100_000
    steps_joint: int = 100_000
    budget_clip_s: float | None = 150.0  # 60 s left the ViT weak on shape in some runs (runs 28, 30)
    budget_align_s: float | None = 15.0
    budget_joint_s: float | None = 450.0
    workers: int = 10
    pool_scenes: int = 40_000  # rendered once, shared by every stage (evaluation scenes are fresh)
    train_vision: bool = True  # joint stage: fine-tune the ViT too, at lr * vision_lr_scale
    vision_lr_scale: float = 0.1
    mrope: bool = False  # inline: 2-D rotary (row, column) positions of the image tokens in the LM (VLMConfig.mrope)
    pos_lm: bool = False  # a learned (row, column) embedding added after the connector (VLMConfig.pos_lm; cross: with resampler_grid)
    pos_lm_keys: bool = True  # cross, pos_lm: False puts the place in the cross-attention values only (VLMConfig.pos_lm_keys)
    pos_lm_fixed: bool = False  # pos_lm: fixed sin-cos places instead of learned ones (VLMConfig.pos_lm_fixed)
    pos_lm_dims: int = 0  # pos_lm: the place replaces the last this-many channels (VLMConfig.pos_lm_dims; 0: added)
    place_readout: bool = True  # cross: blocks read the attended latents' fixed places too (VLMConfig.place_readout; not with pos_lm)
    pos2d_scale: float = 1.0  # the 2-D sin-cos embedding added before the connector, times this
    feature_layer: int = -1  # ViT block the connector reads (-2: the penultimate, as LLaVA; see vision_token_locality.py)
    clip_captions: str = "plain"  # CLIP stage: "plain" scene captions, or "located" (every object with its grid cell)
    clip_hard_negatives: float = 0.0  # CLIP stage: share of scenes paired in the batch with their rebind twin
    clip_shape_negatives: float = 0.0  # CLIP stage: share paired with a twin whose one object has another shape
    clip_dense_shape: float = 1.0  # CLIP stage: + this x a per-patch shape loss (CLIPTrainConfig.dense_shape)
    ground_weight: float = 1.0  # joint stage: + this x the grounding loss (VLMConfig.ground_layer; 0: off)
    ground_layer: int = 2  # the LM layer whose output the grounding head (inline) or the grounded block (cross) reads
    resampler_grid: bool = True  # cross: each latent reads one window of patches (a grid the grounding loss can name)
    resampler_halo: int = 1  # cross: ... and the windows this many cells around it (VLMConfig.resampler_halo)
    halo_keys_only: bool = False  # cross: the halo for the keys only (VLMConfig.halo_keys_only; worse in run 14)
    latents_see_all: bool = False  # cross: grid latents also read each other (VLMConfig.latents_see_all)
    window_queries: bool = True  # cross: grid latents start from their own window's mean (VLMConfig.window_queries)
    two_hop: bool = True  # cross: find the named object on wide latents, read it on narrow ones (VLMConfig.two_hop)
    image_first: bool = False  # cross: images before the question in the user turn (Flamingo's layout; VLMConfig.image_first)
    pointer: str = "answer"  # cross: where the pointer heads learn to find the named objects (VLMConfig.pointer)
    compile: bool = False  # joint stage through torch.compile (Stage.compile; more steps in its time budget on a GPU)
    curriculum_n: int = 0  # joint stage: first train on scenes of at most this many objects (0: none; see vlm_stages)
    curriculum_frac: float = 0.3  # ... for this share of the joint stage's steps and time budget

    def override(self, pairs: list[str]) -> Recipe:
        """FIELD=VALUE pairs, VALUE in JSON (numbers, null, lists, objects): omnigpt.config.override_fields."""
        from omnigpt.config import override_fields

        return override_fields(copy.deepcopy(self), pairs)


def quick_recipe() -> Recipe:
    return Recipe(image_size=64, n_train=(1, 4), n_eval=(1, 2, 3, 4), per_type=24,
                  vision=dict(patch_size=8, d_model=64, n_layers=2, n_heads=4, d_ff=192),
                  text=dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, max_seq_len=256),
                  pixel_shuffle=2, n_latents=16, batch_size=32, clip_batch_size=64, lr=2e-3,
                  steps_clip=300, steps_lm=0, steps_align=60, steps_joint=600,
                  budget_clip_s=None, budget_align_s=None, budget_joint_s=None, workers=0, pool_scenes=3000, ground_layer=0,
                  two_hop=False,  # two looks need grounded blocks after LM layers 1 and 2: a third layer
                  ground_weight=0.5, clip_dense_shape=0.0)  # the CPU figures and the README's examples were made so


def build_vlm(recipe: Recipe, mode: str, tok, vision, lm) -> VLM:
    """A VLM around copies of `vision` and `lm` (so that several modes can start from the same weights)."""
    inline = mode == "inline"
    grid = recipe.resampler_grid and not inline  # the cross options on latents' windows and places need grid latents
    pos_lm = recipe.pos_lm and (inline or grid)
    cfg = VLMConfig(vision=vision.cfg, text=lm.cfg, image_id=tok.image_id, fusion=mode, connector="mlp",
                    pixel_shuffle=recipe.pixel_shuffle if inline else 1, n_latents=recipe.n_latents,
                    resampler_grid=grid, resampler_halo=recipe.resampler_halo if grid else 0,
                    halo_keys_only=recipe.halo_keys_only and grid, latents_see_all=recipe.latents_see_all and grid,
                    window_queries=recipe.window_queries and grid, two_hop=recipe.two_hop and grid and not recipe.halo_keys_only,
                    cross_every=recipe.cross_every, pos2d_scale=recipe.pos2d_scale, feature_layer=recipe.feature_layer,
                    mrope=recipe.mrope and inline, pos_lm=pos_lm, pos_lm_keys=recipe.pos_lm_keys or inline,
                    pos_lm_fixed=recipe.pos_lm_fixed and pos_lm, pos_lm_dims=recipe.pos_lm_dims if pos_lm else 0,
                    place_readout=recipe.place_readout and grid and not pos_lm,  # pos_lm's places are in the latents
                    ground_layer=recipe.ground_layer if grounded(recipe, mode) else None,
                    image_first=recipe.image_first and not inline, pointer="answer" if inline else recipe.pointer)
    return VLM(cfg, vision=copy.deepcopy(vision), lm=copy.deepcopy(lm))


def grounded(recipe: Recipe, mode: str) -> bool:
    """Whether this mode trains with the grounding loss: its image vectors must be a grid (cross: resampler_grid)."""
    return recipe.ground_weight > 0 and (mode == "inline" or recipe.resampler_grid)


def vlm_stages(recipe: Recipe, mode: str = "inline") -> list[Stage]:
    joint_parts = ("connector", "lm", "vision") if recipe.train_vision else ("connector", "lm")
    lr = recipe.lr * (recipe.cross_lr_scale if mode == "cross" else 1.0)
    ground = recipe.ground_weight if grounded(recipe, mode) else 0.0
    joint = Stage("joint", recipe.steps_joint, lr, joint_parts, replace(JOINT_MIX, ground=ground > 0), budget_s=recipe.budget_joint_s,
                  vision_lr_scale=recipe.vision_lr_scale, ground_weight=ground, compile=recipe.compile)
    stages = [Stage("align", recipe.steps_align, lr, ("connector",), ALIGN_MIX, budget_s=recipe.budget_align_s)]
    if not recipe.curriculum_n:
        return stages + [joint]
    # Few objects first: at large N a question's object is found only by binding its named shape or colour, so before
    # the model can find it, a colour answer's gradient reads the wrong object as often as not; with cross fusion
    # and a ViT weak on shape, colour was then never learned (runs 31-34 and the CPU pair, benchmarks/RESULTS.md)
    lo, hi = recipe.n_train
    if not lo <= recipe.curriculum_n < hi or not 0 < recipe.curriculum_frac < 1:
        raise ValueError(f"curriculum_n={recipe.curriculum_n} must lie in [{lo}, {hi}) (n_train) and "
                         f"curriculum_frac={recipe.curriculum_frac} in (0, 1)")
    f, budget = recipe.curriculum_frac, joint.budget_s
    first = replace(joint, name="joint_few", steps=max(1, round(joint.steps * f)), n_range=(lo, recipe.curriculum_n),
                    budget_s=None if budget is None else budget * f, schedule=(0.0, f))
    rest = replace(joint, steps=max(1, joint.steps - first.steps), budget_s=None if budget is None else budget - first.budget_s,
                   schedule=(f, 1.0))  # the learning rate goes on from where joint_few left it
    return stages + [first, rest]


def pretrain_clip(recipe: Recipe, tok, pool, device: torch.device, log=print, metrics_path: str | None = None):
    """(the recipe's ViT, CLIP-trained on scene captions; train_clip's result)."""
    from omnigpt.model.vision import CLIP, CLIPConfig, TextTowerConfig, VisionConfig
    from omnigpt.train.clip import train_clip

    vcfg = VisionConfig(image_size=recipe.image_size, pool="mean", **recipe.vision)
    ttc = TextTowerConfig(vocab_size=tok.padded_vocab_size(), max_len=256, d_model=vcfg.d_model, n_layers=2,
                          n_heads=vcfg.n_heads, d_ff=vcfg.d_ff)
    clip = CLIP(CLIPConfig(vcfg, ttc, embed_dim=128)).to(device)
    res = train_clip(clip, tok, clip_train_config(recipe), log=log, pool=pool, metrics_path=metrics_path)
    return clip.vision, res


def clip_train_config(recipe: Recipe, **more):
    """The recipe's CLIP stage as a CLIPTrainConfig (`more`: its other fields, e.g. real_frac)."""
    from omnigpt.train.clip import CLIPTrainConfig

    return CLIPTrainConfig(steps=recipe.steps_clip, budget_s=recipe.budget_clip_s, batch_size=recipe.clip_batch_size,
                           lr=recipe.lr, n_range=recipe.n_train, image_size=recipe.image_size, workers=recipe.workers,
                           captions=recipe.clip_captions, hard_negatives=recipe.clip_hard_negatives,
                           shape_negatives=recipe.clip_shape_negatives, dense_shape=recipe.clip_dense_shape,
                           **{"log_every": 100, **more})


def vit_from_file(path: str | os.PathLike, recipe: Recipe):
    """The recipe's ViT with the weights of a safetensors file (one clip_vit saved), in fp32."""
    from safetensors.torch import load_file

    from omnigpt.model.vision import ViT, VisionConfig

    vit = ViT(VisionConfig(image_size=recipe.image_size, pool="mean", **recipe.vision))
    vit.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return vit


def clip_vit(recipe: Recipe, tok, pool, device: torch.device, log=print, cache_dir: str | os.PathLike | None = None,
             metrics_path: str | None = None):
    """(the recipe's CLIP-trained ViT, train_clip's result). With cache_dir: the ViT of the same CLIP settings from
    there if it holds one (vit_<key>.safetensors and .json), else trained and saved there. Saved in bf16: the GPU
    recipe's ViT is then 10 MB, which a device call can bring back and carry into the next one; the joint stage
    fine-tunes it in fp32 from there. Several runs that share it start from the same encoder."""
    import hashlib

    from safetensors.torch import save_file

    if cache_dir is None:
        return pretrain_clip(recipe, tok, pool, device, log, metrics_path=metrics_path)
    fields = {k: getattr(recipe, k) for k in ("image_size", "vision", "n_train", "steps_clip", "budget_clip_s",
                                              "clip_batch_size", "lr", "clip_captions", "clip_hard_negatives")}
    for k in ("clip_shape_negatives", "clip_dense_shape"):  # only when set: the ViTs cached before these keep their keys
        if getattr(recipe, k):
            fields[k] = getattr(recipe, k)
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    path, info = Path(cache_dir) / f"vit_{key}.safetensors", Path(cache_dir) / f"vit_{key}.json"
    if path.exists() and info.exists():
        vit = vit_from_file(path, recipe)
        res = json.loads(info.read_text())["clip"]
        shape = f", shape top-1 on object patches {res['object_shape_top1']:.2f}" if res.get("object_shape_top1") is not None else ""
        log(f"CLIP-trained ViT from {path} (retrieval top-1 {res['retrieval_top1']:.2f}{shape}, {res['seconds']:.0f}s to train)")
        return vit.to(device), {**res, "from": str(path)}
    vit, res = pretrain_clip(recipe, tok, pool, device, log, metrics_path=metrics_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in vit.state_dict().items()}, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)  # atomic: a run started alongside never reads half a file
    info.write_text(json.dumps({"recipe": fields, "clip": res}, indent=2, default=str))
    return vit, res


def run_recipe(recipe: Recipe, modes: list[str], out_dir: str | os.PathLike, device: torch.device, log=print,
               vision=None, evaluate: bool = True, vit_cache: str | os.PathLike | None = None) -> dict:
    """The whole ShapeBind run; `vision` (a ViT, e.g. from HF CLIP weights) skips CLIP pre-training, and so does a
    `vit_cache` folder that holds this recipe's CLIP-trained ViT (clip_vit; else it is trained and saved there).
    Writes <out>/<mode>/ checkpoints, <mode>_metrics.jsonl, <mode>_eval.json and summary.json."""
    from omnigpt.config import ModelConfig
    from omnigpt.data.vision_samples import ScenePool, shapebind_tokenizer
    from omnigpt.evals.vqa import eval_pointer, eval_vqa, target_met
    from omnigpt.model.multimodal import save_vlm
    from omnigpt.model.transformer import Transformer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    tok = shapebind_tokenizer()
    vocab = tok.padded_vocab_size()
    data = DataConfig(batch_size=recipe.batch_size, n_range=recipe.n_train, image_size=recipe.image_size, workers=recipe.workers,
                      max_len=recipe.text["max_seq_len"] + 1)
    pool = ScenePool(recipe.pool_scenes, recipe.n_train, recipe.image_size, "pool", workers=max(recipe.workers, (os.cpu_count() or 2) - 2))
    log(f"scene pool: {recipe.pool_scenes} scenes of {recipe.image_size}px, N in {recipe.n_train}, "
        f"{time.perf_counter() - t_start:.0f}s")

    clip_res = None
    if vision is None:  # 1. CLIP pre-training of the vision tower on scene captions
        vision, clip_res = clip_vit(recipe, tok, pool, device, log, cache_dir=vit_cache, metrics_path=str(out / "clip_metrics.jsonl"))
    vision = vision.to(device)

    lm = Transformer(ModelConfig(vocab_size=vocab, **recipe.text)).to(device)  # 2. LM warm-up on scene text
    lm_res = warmup_lm(lm, tok, recipe.steps_lm, data, lr=recipe.lr, log=log, log_every=100, pool=pool)

    results, extra, train_info = {}, {}, {}
    for mode in modes:  # 3. per fusion mode: align, joint, evaluate
        vlm = build_vlm(recipe, mode, tok, vision, lm).to(device)
        stage_res = train_vlm(vlm, tok, vlm_stages(recipe, mode), data, log=log, log_every=200,
                              metrics_path=str(out / f"{mode}_metrics.jsonl"), pool=pool)
        train_info[mode] = stage_res
        save_vlm(vlm, out / mode, tok, extra={"train": stage_res, "recipe": asdict(recipe)})
        extra[mode] = {"params": f"{sum(p.numel() for p in vlm.parameters()) / 1e6:.1f}M",
                       "image tokens in text": vlm.cfg.image_tokens,
                       "steps": "+".join(str(r["steps"]) for r in stage_res),
                       "train": f"{sum(r['seconds'] for r in stage_res):.0f}s", "final loss": f"{stage_res[-1]['loss']:.3f}"}
        if evaluate:
            t0 = time.perf_counter()
            res = eval_vqa(vlm, tok, recipe.n_eval, recipe.per_type, batch_size=256 if device.type == "cuda" else 64, log=log)
            if vlm.cfg.fusion == "cross" and vlm.cfg.ground_layer is not None:  # what the pointer heads find, per look
                res["pointer"] = eval_pointer(vlm, tok, recipe.n_eval, recipe.per_type, log=log)
            (out / f"{mode}_eval.json").write_text(json.dumps(res, indent=2))
            results[mode] = res
            extra[mode].update({"eval": f"{time.perf_counter() - t0:.0f}s", "target met": target_met(res)})
        del vlm
    summary = {"recipe": asdict(recipe), "clip": clip_res, "lm": lm_res, "train": train_info, "results": results,
               "extra": extra, "total_s": time.perf_counter() - t_start, "device": str(device), "torch": torch.__version__}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
