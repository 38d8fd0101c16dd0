"""`omnigpt model-card PRESET`: parameter counts and training FLOPs of a preset, built on the meta device."""

from __future__ import annotations

import torch

from omnigpt.config import PRESETS, preset
from omnigpt.model.transformer import Transformer


def human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def model_card(name: str, seq_len: int | None = None) -> str:
    cfg = preset(name)
    with torch.device("meta"):  # no memory: the gpt4 shape has 1.8T parameters
        model = Transformer(cfg)
    counts = cfg.param_counts()
    built = model.num_params()
    assert built == counts["total"], f"config count {counts['total']} != module count {built}"
    T = seq_len or cfg.max_seq_len
    kind = f"MoE, {cfg.n_experts} experts, top-{cfg.top_k}" if cfg.n_experts else "dense"
    lines = [
        f"preset {name}: {kind}; {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads ({cfg.n_kv_heads} kv) x {cfg.head_dim}, "
        f"d_ff {cfg.d_ff_expert if cfg.n_experts else cfg.d_ff}, vocab {cfg.vocab_size}, context {cfg.max_seq_len}",
        f"total parameters     {human(counts['total']):>9}  ({counts['total']:,}; built on the meta device: {built:,})",
        f"active per token     {human(counts['active']):>9}  ({counts['active']:,})",
        f"active in matmuls    {human(counts['active_matmul']):>9}  (N_active: no input embedding)",
    ]
    if cfg.n_experts:
        lines.append(f"one expert, all layers {human(counts['one_expert_all_layers']):>7}")
    lines.append(
        f"training FLOPs/token {human(cfg.flops_per_token(T)):>9}  = 6*N_active + 12*L*H*hd*T at T={T} "
        f"(forward+backward, PaLM convention)"
    )
    return "\n".join(lines)


def cmd_model_card(args) -> None:
    print(model_card(args.preset, args.seq_len))


def add_commands(sub) -> None:
    p = sub.add_parser("model-card", help="parameter counts and FLOPs per token of a preset")
    p.add_argument("preset", choices=sorted(PRESETS), metavar="PRESET", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for the attention FLOPs term")
    p.set_defaults(func=cmd_model_card)
