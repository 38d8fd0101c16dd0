"""The omnigpt decoder-only transformer: RMSNorm, RoPE, grouped-query attention (SDPA), SwiGLU or MoE.

Shape legend: B batch, T query length, S cached key length, D model width, H query heads, G key/value heads,
h head dim, V vocabulary.

Weight-compatible with Hugging Face Llama (dense), Mixtral and Qwen3-MoE (MoE): q/k/v and gate/up are fused
here (one matmul each) and split by `omnigpt.interop` on export.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from omnigpt.config import ModelConfig
from omnigpt.model.moe import MoE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 then scale in the input dtype, as HF Llama does (bit-compatible in float32).
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)


# ---- rotary position embedding -------------------------------------------------------------------------------
def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    h = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, h, 2, dtype=torch.float64) / h))
    s = cfg.rope_scaling
    if s is None or s.factor == 1.0:
        return inv_freq.float()
    if s.kind == "linear":
        return (inv_freq / s.factor).float()
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    low_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_wavelen = s.original_max_seq_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    mixed = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    out = torch.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), mixed, out)
    return out.float()


def rope_cos_sin(inv_freq: torch.Tensor, pos_BT: torch.Tensor):
    freqs = pos_BT.unsqueeze(-1).float() * inv_freq  # (B, T, h/2), float32 even under autocast
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().unsqueeze(2), emb.sin().unsqueeze(2)  # (B, T, 1, h)


def apply_rope(x_BTHh: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.to(x_BTHh.dtype), sin.to(x_BTHh.dtype)
    x1, x2 = x_BTHh.chunk(2, dim=-1)  # "rotate half" pairing (HF), not interleaved pairs
    return x_BTHh * cos + torch.cat([-x2, x1], dim=-1) * sin


# ---- KV cache ------------------------------------------------------------------------------------------------
class KVCache:
    """Slot cache: batch row b is one sequence and slot s holds its token at position s.

    Rows advance independently (each has its own position), so prompts of different lengths need no left
    padding and the serving engine can put a new request into a free row while others are mid-generation.
    A query at position p attends to slots 0..p of its row; slots past p may hold stale values and are masked.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layers, batch_size, max_len, cfg.n_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        # Slots attention reads. None: up to the furthest position in the batch (a host sync per layer);
        # a fixed number keeps shapes static, which CUDA graphs and torch.compile need.
        self.read_len: int | None = None

    def write(self, layer: int, pos_BT: torch.Tensor, k_BTGh: torch.Tensor, v_BTGh: torch.Tensor):
        rows = torch.arange(pos_BT.shape[0], device=pos_BT.device).unsqueeze(1)
        self.k[layer][rows, pos_BT] = k_BTGh.to(self.k.dtype)
        self.v[layer][rows, pos_BT] = v_BTGh.to(self.v.dtype)

    def read(self, layer: int, length: int):
        return self.k[layer, :, :length], self.v[layer, :, :length]


def cache_mask(pos_BT: torch.Tensor, length: int) -> torch.Tensor:
    """(B, 1, T, S) boolean: query at position p sees slots 0..p of its own row."""
    slots = torch.arange(length, device=pos_BT.device)
    return (slots <= pos_BT.unsqueeze(-1)).unsqueeze(1)


def document_mask(doc_ids_BT: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean: causal, and a token attends only inside its own packed document."""
    T = doc_ids_BT.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids_BT.device).tril()
    same_doc = doc_ids_BT.unsqueeze(-1) == doc_ids_BT.unsqueeze(-2)
    return (causal & same_doc).unsqueeze(1)


def prefer_cudnn_attention() -> bool:
    """Put cuDNN's fused attention first in SDPA's kernel order; flash, memory-efficient and math stay as fallbacks.

    PyTorch's default order tries cuDNN only after the math kernel, i.e. never; on Hopper at head_dim 64 it
    runs causal attention fwd+bwd at ~1.5x the flash kernel (benchmarks/RESULTS.md). Call before torch.compile:
    the compiled graph keeps the kernel chosen while tracing.
    """
    if not (torch.cuda.is_available() and hasattr(torch._C, "_set_sdp_priority_order")):
        return False
    from torch.nn.attention import SDPBackend

    cudnn = int(SDPBackend.CUDNN_ATTENTION)
    torch._C._set_sdp_priority_order([cudnn] + [b for b in torch._C._get_sdp_priority_order() if b != cudnn])
    torch.backends.cuda.enable_cudnn_sdp(True)
    return True


# ---- layers --------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x_BTD, cos, sin, mask=None, cache: KVCache | None = None, layer: int = 0, pos_BT=None):
        B, T, _ = x_BTD.shape
        H, G, h = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x_BTD).split([H * h, G * h, G * h], dim=-1)
        q, k, v = q.view(B, T, H, h), k.view(B, T, G, h), v.view(B, T, G, h)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cache.write(layer, pos_BT, k, v)
            length = getattr(cache, "read_len", None) or int(pos_BT.max()) + 1
            k, v = cache.read(layer, length)
            k, v = k.to(q.dtype), v.to(q.dtype)
            mask = cache_mask(pos_BT, length)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=G != H)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * h))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w_gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(index)
        self.mlp = MoE(cfg) if self.is_moe else SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x, cos, sin, mask=None, cache=None, pos_BT=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, self.index, pos_BT)
        if self.is_moe:
            y, aux, load = self.mlp(self.mlp_norm(x))
            return x + y, aux, load
        return x + self.mlp(self.mlp_norm(x)), None, None


@dataclass
class ModelOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None  # lm_loss + aux_loss: what training minimises
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None  # (MoE layers, E): fraction of routed pairs per expert
    ground_loss: torch.Tensor | None = None  # VLM with a grounding head, given grounding targets (multimodal.VLM)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        std, out_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        self.inv_freq.copy_(rope_inv_freq(self.cfg))
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w_down.weight", "w_down")):
                nn.init.normal_(p, std=out_std)  # residual-branch outputs shrink with depth (GPT-2)
            else:
                nn.init.normal_(p, std=std)

    def _apply(self, fn, recurse=True):
        # Keep RoPE frequencies in float32 (and recomputed, e.g. after to_empty) whatever the weights become.
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.cfg).to(self.inv_freq.device)
        return self

    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        idx_BT: torch.Tensor | None,
        targets_BT: torch.Tensor | None = None,
        *,
        pos_BT: torch.Tensor | None = None,
        doc_ids_BT: torch.Tensor | None = None,
        cache: KVCache | None = None,
        embeds_BTD: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> ModelOutput:
        """Next-token logits and, given targets (-100 = ignore), the loss.

        embeds_BTD replaces the token embeddings (modality encoders splice their features in first).
        pos_BT defaults to 0..T-1; with a cache it is required and says where each row's tokens go.
        doc_ids_BT restricts attention to each packed document. last_only returns logits of the last position.
        """
        x = self.embed(idx_BT) if embeds_BTD is None else embeds_BTD
        B, T, _ = x.shape
        if pos_BT is None:
            if cache is not None:
                raise ValueError("a KV cache needs pos_BT (each row's positions)")
            pos_BT = torch.arange(T, device=x.device).expand(B, T)
        cos, sin = rope_cos_sin(self.inv_freq, pos_BT)
        mask = document_mask(doc_ids_BT) if doc_ids_BT is not None and cache is None else None

        aux_losses, loads = [], []
        for block in self.layers:
            x, aux, load = block(x, cos, sin, mask, cache, pos_BT)
            if aux is not None:
                aux_losses.append(aux)
                loads.append(load)
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        logits = F.linear(x, self.head_weight())

        out = ModelOutput(logits=logits)
        if loads:
            out.expert_load = torch.stack(loads)
            out.aux_loss = torch.stack(aux_losses).sum()
        if targets_BT is not None:
            out.lm_loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets_BT.reshape(-1), ignore_index=-100)
            out.loss = out.lm_loss + (out.aux_loss if out.aux_loss is not None else 0.0)
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
