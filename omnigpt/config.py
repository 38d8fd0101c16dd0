"""Model configs: one plain dataclass and named presets.

FLOPs convention (used for training length and MFU everywhere in omnigpt):
    training FLOPs per token = 6 * N_active + 12 * L * H * hd * T
where N_active counts the parameters a token touches in matmuls (attention, the dense MLP or the k routed
experts plus the router, the output head; not the input embedding, which is a lookup), and the second term
is the attention score/value matmuls at sequence length T (PaLM appendix B, counting the full T x T square).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


@dataclass
class RopeScaling:
    """Stretch RoPE to longer contexts. kind: "linear" (position interpolation) or "llama3" (frequency-band
    interpolation, as in HF Llama's rope_type="llama3")."""

    kind: str = "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass
class ModelConfig:
    vocab_size: int = 512
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # default d_model // n_heads
    d_ff: int = 128  # SwiGLU hidden width of dense layers
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qk_norm: bool = False  # RMSNorm on each head's q and k (Qwen3)
    # Mixture of Experts: n_experts == 0 means every layer is dense.
    n_experts: int = 0
    top_k: int = 2
    d_ff_expert: int | None = None  # default d_ff
    dense_layers: tuple[int, ...] = ()  # layer indices that stay dense in an MoE model
    norm_topk: bool = True  # renormalise the k chosen router probabilities (Mixtral; Qwen3 norm_topk_prob)
    aux_loss_coef: float = 0.01  # Switch load-balancing loss
    z_loss_coef: float = 0.001  # router z-loss (ST-MoE)
    init_std: float = 0.02

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        self.dense_layers = tuple(self.dense_layers)
        if self.head_dim is None:
            if self.n_heads <= 0 or self.d_model % self.n_heads:
                raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads} (or set head_dim)")
            self.head_dim = self.d_model // self.n_heads
        if self.d_ff_expert is None:
            self.d_ff_expert = self.d_ff
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"invalid ModelConfig: {msg}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len"):
            need(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be positive")
        need(self.n_heads % self.n_kv_heads == 0, f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        need(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE")
        need(self.n_experts >= 0, f"n_experts={self.n_experts} must be >= 0")
        if self.n_experts:
            need(1 <= self.top_k <= self.n_experts, f"top_k={self.top_k} must be in [1, n_experts={self.n_experts}]")
            need(self.d_ff_expert > 0, f"d_ff_expert={self.d_ff_expert} must be positive")
        bad = [i for i in self.dense_layers if not 0 <= i < self.n_layers]
        need(not bad, f"dense_layers={self.dense_layers} has indices outside [0, n_layers={self.n_layers})")
        if self.rope_scaling is not None:
            need(self.rope_scaling.kind in ("linear", "llama3"), f"rope_scaling.kind={self.rope_scaling.kind!r} must be 'linear' or 'llama3'")
            need(self.rope_scaling.factor >= 1.0, f"rope_scaling.factor={self.rope_scaling.factor} must be >= 1")

    # ---- derived quantities -------------------------------------------------------------------------------
    def is_moe_layer(self, i: int) -> bool:
        return self.n_experts > 0 and i not in self.dense_layers

    def param_counts(self) -> dict[str, int]:
        """Exact parameter counts of the model this config builds (checked against the module in tests)."""
        d, hd, L = self.d_model, self.head_dim, self.n_layers
        attn = d * hd * (self.n_heads + 2 * self.n_kv_heads) + self.n_heads * hd * d + (2 * hd if self.qk_norm else 0)
        norms = 2 * d
        dense_mlp = 3 * d * self.d_ff
        expert = 3 * d * self.d_ff_expert
        router = d * self.n_experts
        n_moe = sum(self.is_moe_layer(i) for i in range(L))
        n_dense = L - n_moe
        embed = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        total = embed + head + d + L * (attn + norms) + n_dense * dense_mlp + n_moe * (router + self.n_experts * expert)
        # Active: what one token multiplies through. A tied head is still a matmul, so count it.
        active_matmul = L * attn + n_dense * dense_mlp + n_moe * (router + self.top_k * expert) + self.vocab_size * d
        return {
            "total": total,
            "active": active_matmul + embed + d + L * norms,
            "active_matmul": active_matmul,
            "embedding": embed,
            "one_expert_all_layers": n_moe * expert,
        }

    def flops_per_token(self, seq_len: int | None = None) -> float:
        T = seq_len or self.max_seq_len
        return 6 * self.param_counts()["active_matmul"] + 12 * self.n_layers * self.n_heads * self.head_dim * T

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# ---- presets ---------------------------------------------------------------------------------------------
def tiny(**kw) -> ModelConfig:
    """A few hundred thousand parameters: CPU tests and the CPU speedrun."""
    return ModelConfig(**{**dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=256), **kw})


def tiny_moe(**kw) -> ModelConfig:
    return tiny(**{**dict(n_experts=4, top_k=2, d_ff_expert=64), **kw})


def small(**kw) -> ModelConfig:
    """GPT-2-small width (d=768, 12 layers): ~110M active matmul parameters, ~135M total with a 32K vocab."""
    return ModelConfig(**{**dict(vocab_size=32768, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2048, max_seq_len=2048), **kw})


def small_moe(**kw) -> ModelConfig:
    """The `small` width with a Mixtral-style MoE in every layer: 8 experts, top-2."""
    return small(**{**dict(n_experts=8, top_k=2, d_ff_expert=2048), **kw})


def gpt4(**kw) -> ModelConfig:
    """The shape the seeds describe: 16 experts, 2 active, ~1.8T parameters.

    The seeds' "~111B" is the size of one expert across all layers (108.7B here). Top-2 of 16 experts with
    1.8T in total cannot touch only 111B per token (two experts alone are 2/16 of the expert weights), so a
    token's active count is ~292B, close to the leak's "~280B per forward pass".
    """
    return ModelConfig(**{**dict(
        vocab_size=100352, d_model=12288, n_layers=120, n_heads=96, n_kv_heads=96, d_ff=49152, max_seq_len=32768,
        n_experts=16, top_k=2, d_ff_expert=24576, rope_theta=500000.0,
    ), **kw})


PRESETS = {"tiny": tiny, "tiny-moe": tiny_moe, "small": small, "small-moe": small_moe, "gpt4": gpt4}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name](**overrides)


def override_fields(config, pairs: list[str]):
    """A copy of the dataclass `config` with FIELD=VALUE pairs applied (the `--set` of recipes, ladders, demos).

    VALUE is JSON (numbers, true, null, lists, objects) or, when it does not parse, a plain string. A list for a
    tuple field becomes a tuple. An unknown field, or a value of the wrong kind for the field's current value
    (a string for a number, a number for a flag), raises ValueError naming it; null is accepted anywhere."""
    types = {f.name: f.type for f in dataclasses.fields(config)}
    names = list(types)
    changes = {}
    for item in pairs:
        key, eq, raw = item.partition("=")
        if not eq or key not in names:
            raise ValueError(f"{item!r}: expected FIELD=VALUE with FIELD one of {', '.join(names)}")
        old = getattr(config, key)
        try:
            value = raw if isinstance(old, str) else json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        number = (int, float)
        ok = (value is None or old is None
              or (isinstance(old, bool) and isinstance(value, bool))
              or (isinstance(old, number) and not isinstance(old, bool) and isinstance(value, number) and not isinstance(value, bool))
              or (not isinstance(old, (bool, *number)) and isinstance(value, type(old))))
        if not ok:
            raise ValueError(f"{key}={raw!r}: expected {type(old).__name__} (current value {old!r})")
        if type(value) is int and (isinstance(old, float) or "float" in str(types[key])):
            value = float(value)  # a float field holds a float: budget_clip_s=150 is the default 150.0 (cache keys)
        changes[key] = value
    return dataclasses.replace(config, **changes)
