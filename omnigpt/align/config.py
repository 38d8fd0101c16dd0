"""Configs of the alignment trainers: plain dataclasses, one field per command-line flag (no torch import here,
so `omnigpt --help` stays fast)."""

from __future__ import annotations

from dataclasses import dataclass


def _positive(cfg, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")


@dataclass
class AlignConfig:
    out_dir: str = "runs/align"
    steps: int = 100
    batch_size: int = 16  # per rank: conversations / comparisons / prompts per step
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # <= 0: no clipping (the norm is still logged)
    schedule: str = "cosine"  # cosine | wsd (omnigpt.train.optim.lr_factor)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    max_len: int = 512  # tokens of prompt + answer; longer examples are truncated (SFT) or skipped
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: at the end only
    ckpt_every: int = 0  # 0: at the end only
    keep_checkpoints: int = 2
    device: str | None = None  # cpu | cuda | None (cuda when available)

    def validate(self) -> None:
        _positive(self, "steps", "batch_size", "max_len", "log_every", "lr")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"--schedule must be cosine or wsd, got {self.schedule!r}")


@dataclass
class SFTConfig(AlignConfig):
    lr: float = 3e-4
    seq_len: int = 512  # packed row length (conversations longer than this are truncated)
    pack: bool = True  # False: one conversation per row


@dataclass
class RewardConfig(AlignConfig):
    lr: float = 1e-4


@dataclass
class DPOConfig(AlignConfig):
    lr: float = 1e-5
    beta: float = 0.1


@dataclass
class PPOConfig(AlignConfig):
    lr: float = 1e-5
    batch_size: int = 16  # prompts per rank per step, one response each
    max_new_tokens: int = 64
    temperature: float = 1.0  # sampling temperature; logits are divided by it for every log-probability
    ppo_epochs: int = 4
    minibatches: int = 2  # per rank per epoch
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.5
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05  # beta (its starting value when target_kl > 0)
    target_kl: float = 0.0  # > 0: adapt beta so the KL per response approaches this (nats)
    kl_horizon: int = 10000
    ptx_coef: float = 0.0  # PPO-ptx: weight of the pretraining loss
    ptx_batch_size: int = 4
    ptx_seq_len: int = 256
    missing_eos_penalty: float = 0.0  # subtracted from the score of a response cut at max_new_tokens
    whiten_advantages: bool = True
    # > 0: before training, score this many of the starting policy's responses with the reward model and use
    # (score - mean) / std from then on (value outputs alike): beta then trades nats against standard deviations of
    # score, whatever scale the reward model's fit landed on. Reward-model PPO only (the verifier's 1/0 is unchanged)
    reward_norm_samples: int = 0

    def validate(self) -> None:
        super().validate()
        _positive(self, "max_new_tokens", "ppo_epochs", "minibatches", "temperature")


@dataclass
class GRPOConfig(AlignConfig):
    lr: float = 1e-5
    batch_size: int = 4  # prompts per rank per step
    group_size: int = 8  # responses per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    epochs: int = 1  # passes over each batch of groups (1: one on-policy update)
    minibatches: int = 1
    clip_range: float = 0.2
    kl_coef: float = 0.04

    def validate(self) -> None:
        super().validate()
        _positive(self, "max_new_tokens", "epochs", "minibatches", "temperature")
        if self.group_size < 2:
            raise ValueError(f"--group-size must be at least 2 (advantages are relative to the group), got {self.group_size}")
