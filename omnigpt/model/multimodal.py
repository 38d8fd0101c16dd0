"""Vision-language model: a ViT, a connector and the omnigpt Transformer, fused inline or by gated cross-attention.

Shape legend: B rows, T tokens, D LM width, N images of the batch (rows in order, each row's in order of
appearance), P patch tokens of an image, V vision width, L tokens an image becomes, M images of a row (padded),
Q = M*L media tokens of a row.

inline (KOSMOS-1 / LLaVA): an image is `<|image_start|>` + L x `<|image|>` + `<|image_end|>` in the text; the L
    placeholder embeddings are replaced by the connector's L output vectors (an MLP over patches, optionally
    pixel-shuffled s x s -> one token, or a Perceiver resampler to L latents) and the LM runs on `embeds_BTD`.
    Targets that are `<|image|>` placeholders are never learned: loss on text only.
cross (Flamingo): an image is one `<|image|>` token in the text. A Perceiver resampler turns it into L latents,
    and a gated cross-attention block runs before every `cross_every`-th LM layer: each token attends to the latents
    of the images at or before its position. Its outputs are scaled by tanh(gate), gates start at 0, so at
    initialisation the VLM computes exactly what the LM alone computes. The blocks are attached with forward
    pre-hooks on the LM's layers, so the LM's own weights, names and forward (KV cache included) are untouched.

Grounding loss (off unless ground_layer is set; needs an image's vectors on a grid: the inline mlp connector, or a
resampler with resampler_grid). Without it, answers that need *which* image vector holds an object ("where is the
red star?") sit at chance once there are two objects (benchmarks/RESULTS.md). Targets: scenes.token_labels, each
grid cell marked as showing the question's first named object, its second, or neither.
- inline: a linear head on the output of LM layer ground_layer classifies each image token so. The image tokens
  come after the question: they learn to mark the objects asked about, and later layers attend to the marks.
- cross: the latents do not see the question, so the text must find the objects: at every position of the answer,
  heads 0 and 1 of the gated cross-attention block after layer ground_layer learn to put their attention on the
  latents of the first and second named object (pointer_loss; the values they read then carry where it is). With
  image_first and pointer="mention", head 0 learns it at the question's own words instead: the last word of each
  phrase that names an object points at that object, and the answer reads those words (pointer_targets).
- cross, two_hop (with resampler_halo): an image gives 2L latents, the L of the wide view (each place with its
  halo: whole objects, findable by shape) and then the L of the narrow view (each place's own window: only its own
  colour). Heads 0 and 1 of the grounded block point at the named objects among the wide latents, and heads 0 and 1
  of the next block point at them again among the narrow ones. The first look reads *where* the object is; an
  average over the object's neighbourhood still says that about right. The second look can then find the place by
  position and read a colour that is not mixed with the neighbours'. Compare halo_keys_only: one look, wide keys
  and narrow values, whose attention spread over the neighbours' background values (RESULTS.md, run 14).

Where an image token is (inline, mlp connector: the L tokens are a gh x gw grid in reading order):
- pos2d (default on): a fixed 2-D sin-cos (row, column) embedding added to the patch features before the connector;
- pos_lm (off): learned row and column embeddings added to the connector's output, in the LM's width (also for
  the latents of a grid resampler, where each latent is a place); with cross fusion and pos_lm_keys=False only the
  values of the cross-attention read it, so the pointer heads must find an object by what it is, not by where
  objects usually are (the latents then carry two channel views, [content | content + place], as split_kv reads);
  pos_lm_fixed makes the places a fixed sin-cos (sincos_2d in the LM's width) instead of trained parameters;
  pos_lm_dims=P writes the place into the last P channels (dropping the content there) instead of adding it to all;
- place_readout (off; cross, grid latents): the latents stay as they are, and each gated cross-attention block
  reads, besides its values, the fixed sin-cos place of the latents it attends to, with the same attention, through
  its own projection that starts at zero. At init the model is the one without places; the place enters only as
  far as training asks. With a ViT strong on shape it is what made cross fusion meet the ShapeBind target
  (run 36 in RESULTS.md: colour 100%, position 99-100% at N <= 4), where places added to the values (pos_lm)
  kept colour from being learned (run 35). The recipe turns it on (train.vlm.Recipe); the config default stays
  off, so checkpoints saved without it load as they were. The second attention over the places recomputes the
  first one's weights: +5% of a step on the CPU.
- mrope (off): M-RoPE (Qwen2-VL) in the LM: image tokens rotate by (temporal, row, column) positions, text by
  (p, p, p), i.e. exactly 1-D RoPE (`mrope_positions`). Applied through forward pre-hooks that swap the layers'
  cos/sin while `VLM.rotary` is active (VLM.forward, and the prefill of generate_vlm; decode steps are text).
  Other callers of the LM that splice images themselves must do the same (the serving engine does not yet).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from omnigpt.config import ModelConfig
from omnigpt.model.transformer import ModelOutput, RMSNorm, SwiGLU, Transformer
from omnigpt.model.vision import ViT, VisionConfig

IGNORE = -100


@dataclass
class VLMConfig:
    vision: VisionConfig
    text: ModelConfig
    image_id: int  # the tokenizer's <|image|> placeholder id
    fusion: str = "inline"  # inline | cross
    connector: str = "mlp"  # inline only: mlp | resampler (cross always resamples)
    pixel_shuffle: int = 1  # mlp connector: s x s neighbouring patches become one token (s^2 fewer tokens)
    n_latents: int = 16  # resampler: tokens per image
    resampler_layers: int = 2
    resampler_heads: int = 4
    resampler_grid: bool = False  # resampler: latents on a sqrt(L) x sqrt(L) grid, each reading only its window of patches
    resampler_halo: int = 0  # resampler_grid: a latent also reads the windows up to this many cells away (whole objects)
    halo_keys_only: bool = False  # cross: the halo widens what the keys read, the values read each place's own window
    latents_see_all: bool = False  # resampler_grid: a latent reads every latent (Flamingo's keys), patches stay windowed
    window_queries: bool = False  # resampler_grid: a latent starts as its learned vector + the mean of its own window
    two_hop: bool = False  # cross: an image is 2L latents, the wide (halo) view then the own-window view (module doc)
    qk_norm: bool = True  # RMSNorm on each head's queries and keys in the resampler and the gated cross-attention blocks
    cross_every: int = 1  # cross: a gated cross-attention block before layers 0, n, 2n, ...
    feature_layer: int = -1  # vision block whose output feeds the connector (-2: the penultimate, as LLaVA)
    pos2d: bool = True  # add a fixed 2-D sin-cos (row, column) embedding to the patch features before the connector
    pos2d_scale: float = 1.0  # pos2d: the sin-cos embedding is multiplied by this (1: as before)
    pos_lm: bool = False  # add a learned (row, column) embedding in the LM's width after the connector (inline mlp,
    # or a grid resampler: each latent's place, for both views of two_hop)
    pos_lm_keys: bool = True  # cross, pos_lm: the cross-attention keys see the place too (False: the values only)
    pos_lm_fixed: bool = False  # pos_lm: the place is a fixed 2-D sin-cos in the LM's width (sincos_2d), not learned
    pos_lm_dims: int = 0  # pos_lm: the place replaces the last this-many channels (0: added to all of them)
    place_readout: bool = False  # cross, grid latents: blocks also read the attended latents' fixed places (module doc)
    mrope: bool = False  # inline mlp: image tokens get 2-D rotary positions in the LM (M-RoPE; see mrope_positions)
    ground_layer: int | None = None  # grounding loss on this LM layer's output (None: none); needs image tokens on a grid
    pointer: str = "answer"  # cross grounding: heads point at the named objects from the answer, the "mention"s, or "both"
    image_first: bool = False  # chat prompts put the images before the question text (training and evaluation)

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = VisionConfig.from_dict(self.vision)
        if isinstance(self.text, dict):
            self.text = ModelConfig.from_dict(self.text)
        if self.fusion not in ("inline", "cross"):
            raise ValueError(f"invalid VLMConfig: fusion={self.fusion!r}; choose inline or cross")
        if self.connector not in ("mlp", "resampler"):
            raise ValueError(f"invalid VLMConfig: connector={self.connector!r}; choose mlp or resampler")
        if self.uses_resampler and self.pixel_shuffle != 1:
            raise ValueError("invalid VLMConfig: pixel_shuffle applies to the mlp connector of inline fusion only")
        if self.vision.grid % self.pixel_shuffle:
            raise ValueError(f"invalid VLMConfig: patch grid {self.vision.grid} is not divisible by pixel_shuffle={self.pixel_shuffle}")
        if not 0 <= self.image_id < self.text.vocab_size:
            raise ValueError(f"invalid VLMConfig: image_id={self.image_id} is outside the vocabulary of {self.text.vocab_size}")
        if self.cross_every < 1 or self.n_latents < 1:
            raise ValueError("invalid VLMConfig: cross_every and n_latents must be >= 1")
        if self.mrope and self.uses_resampler:
            raise ValueError("invalid VLMConfig: mrope needs image tokens on a grid in the text (inline fusion, mlp connector)")
        if self.pos_lm_fixed and not self.pos_lm:
            raise ValueError("invalid VLMConfig: pos_lm_fixed=True needs pos_lm=True (it says how pos_lm's places are made)")
        if self.pos_lm_dims and not (self.pos_lm and 4 <= self.pos_lm_dims < self.text.d_model and self.pos_lm_dims % 4 == 0):
            raise ValueError(f"invalid VLMConfig: pos_lm_dims={self.pos_lm_dims} needs pos_lm=True and a multiple of 4 "
                             f"below the LM's width {self.text.d_model}")
        if self.pos_lm and self.uses_resampler and not self.resampler_grid:
            raise ValueError("invalid VLMConfig: pos_lm needs image vectors on a grid (inline mlp connector, or resampler_grid)")
        if not self.pos_lm_keys and not (self.pos_lm and self.fusion == "cross" and not self.halo_keys_only):
            raise ValueError("invalid VLMConfig: pos_lm_keys=False needs pos_lm with cross fusion, and not halo_keys_only "
                             "(which already splits the keys' and the values' views)")
        if self.place_readout and not (self.fusion == "cross" and self.resampler_grid and not self.pos_lm):
            raise ValueError("invalid VLMConfig: place_readout needs cross fusion with grid latents (resampler_grid), "
                             "and not pos_lm (one way of giving the latents places)")
        if self.resampler_grid and self.uses_resampler:
            g = math.isqrt(self.n_latents)
            if g * g != self.n_latents or self.vision.grid % g:
                raise ValueError(f"invalid VLMConfig: resampler_grid needs n_latents = g*g with g dividing the patch grid "
                                 f"{self.vision.grid}; got n_latents={self.n_latents}")
        if self.resampler_halo < 0 or (self.resampler_halo and not (self.resampler_grid and self.uses_resampler)):
            raise ValueError(f"invalid VLMConfig: resampler_halo={self.resampler_halo} needs a grid resampler "
                             "(resampler_grid and cross fusion or connector='resampler') and must be >= 0")
        if self.pointer not in ("answer", "mention", "both"):
            raise ValueError(f"invalid VLMConfig: pointer={self.pointer!r}; choose answer, mention or both")
        if self.pointer != "answer" and not (self.fusion == "cross" and self.image_first):
            raise ValueError(f"invalid VLMConfig: pointer={self.pointer!r} grounds the question's words in the image: it "
                             "needs cross fusion with image_first (a word sees only the images before it)")
        if self.latents_see_all and not (self.resampler_grid and self.uses_resampler):
            raise ValueError("invalid VLMConfig: latents_see_all needs a grid resampler (a free resampler's latents see all)")
        if self.window_queries and not (self.resampler_grid and self.uses_resampler):
            raise ValueError("invalid VLMConfig: window_queries needs a grid resampler (a latent's own window)")
        if self.halo_keys_only and not (self.resampler_halo and self.fusion == "cross"):
            raise ValueError("invalid VLMConfig: halo_keys_only needs cross fusion and resampler_halo >= 1")
        if self.two_hop and not (self.resampler_halo and self.fusion == "cross" and not self.halo_keys_only):
            raise ValueError("invalid VLMConfig: two_hop needs cross fusion and resampler_halo >= 1 (a wide and a narrow "
                             "view), and not halo_keys_only (which fuses the two views into one latent)")
        if self.ground_layer is not None:
            if self.ground_grid is None:
                raise ValueError("invalid VLMConfig: ground_layer needs image tokens on a grid (inline mlp connector, or resampler_grid)")
            if not 0 <= self.ground_layer < self.text.n_layers:
                raise ValueError(f"invalid VLMConfig: ground_layer={self.ground_layer} is not a layer of the {self.text.n_layers}-layer LM")
            if self.fusion == "cross" and self.text.n_heads < 2:
                raise ValueError("invalid VLMConfig: cross fusion grounds heads 0 and 1 of a block: the LM needs n_heads >= 2")
            if self.fusion == "cross" and self.ground_layer + 1 not in self.cross_layers():
                raise ValueError(f"invalid VLMConfig: cross fusion grounds the gated cross-attention block after layer "
                                 f"ground_layer={self.ground_layer}, and there is none (blocks before layers {self.cross_layers()})")
            if self.two_hop and self.ground_layer + 2 not in self.cross_layers():
                raise ValueError(f"invalid VLMConfig: two_hop grounds its second look in the block after layer "
                                 f"ground_layer + 1 = {self.ground_layer + 1}, and there is none (blocks before layers "
                                 f"{self.cross_layers()})")

    @property
    def uses_resampler(self) -> bool:
        return self.fusion == "cross" or self.connector == "resampler"

    @property
    def tokens_per_image(self) -> int:
        """L: vectors an image becomes (inline: spliced into the text; cross: attended to)."""
        if self.uses_resampler:
            return self.n_latents * (2 if self.two_hop else 1)
        return (self.vision.grid // self.pixel_shuffle) ** 2

    @property
    def token_grid(self) -> tuple[int, int]:
        """(rows, columns) of an image's tokens in the text (inline mlp connector), in reading order."""
        g = self.vision.grid // self.pixel_shuffle
        return g, g

    @property
    def ground_grid(self) -> int | None:
        """g when an image's L vectors are a g x g grid in reading order (what grounding labels refer to), else None."""
        if not self.uses_resampler:
            return self.token_grid[0]
        return math.isqrt(self.n_latents) if self.resampler_grid else None

    @property
    def image_tokens(self) -> int:
        """`<|image|>` placeholders per image in the text (what render_chat's image_tokens should be)."""
        return self.tokens_per_image if self.fusion == "inline" else 1

    def cross_layers(self) -> list[int]:
        return list(range(0, self.text.n_layers, self.cross_every)) if self.fusion == "cross" else []

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VLMConfig:
        return cls(**d)


# ---- connectors --------------------------------------------------------------------------------------------------
def pixel_shuffle(x_BPV: torch.Tensor, grid: tuple[int, int], s: int) -> torch.Tensor:
    """(B, gh*gw, V) -> (B, gh*gw/s^2, s^2*V): each s x s block of neighbouring patches becomes one token."""
    if s == 1:
        return x_BPV
    B, _, V = x_BPV.shape
    gh, gw = grid
    x = x_BPV.view(B, gh // s, s, gw // s, s, V).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (gh // s) * (gw // s), s * s * V)


def sincos_2d(gh: int, gw: int, dim: int, device=None) -> torch.Tensor:
    """(gh*gw, dim) fixed embedding: a quarter of the dims sin/cos of the row, a quarter of the column, rest 0."""
    q = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(q, device=device, dtype=torch.float32) / max(1, q)))
    rows = torch.arange(gh, device=device, dtype=torch.float32).repeat_interleave(gw)
    cols = torch.arange(gw, device=device, dtype=torch.float32).repeat(gh)
    out = torch.zeros(gh * gw, dim, device=device)
    for k, pos in enumerate((rows, cols)):
        angles = pos[:, None] * freqs[None, :]
        out[:, 2 * k * q: (2 * k + 1) * q] = angles.sin()
        out[:, (2 * k + 1) * q: (2 * k + 2) * q] = angles.cos()
    return out


# ---- 2-D rotary positions (M-RoPE) ---------------------------------------------------------------------------
def mrope_positions(ids_BT: torch.Tensor, pos_BT: torch.Tensor, image_id: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, T, 3) rotary positions on the axes (temporal, row, column), as Qwen2-VL's M-RoPE.

    A text token at position p is (p, p, p), so text rotates exactly as with 1-D RoPE. The k-th token of an image
    whose first token sits at p0 is (p0, p0 + k // gw, p0 + k % gw): all of an image is one time step, and the
    rotation between two of its tokens (or between a later text token and them) follows their row and column
    offsets. Text after the image keeps its sequence position (no compaction as in Qwen2-VL), so a KV cache's
    slot positions stay the rotary positions of everything decoded. Each row must hold whole images (a training
    batch or a prefill), in runs of gh * gw consecutive placeholders."""
    gh, gw = grid
    where = ids_BT == image_id
    k = (where.cumsum(1) - 1) % (gh * gw)  # index of each placeholder in its image (meaningless elsewhere)
    p0 = pos_BT - k
    return torch.stack([torch.where(where, p0, pos_BT), torch.where(where, p0 + k // gw, pos_BT),
                        torch.where(where, p0 + k % gw, pos_BT)], dim=-1)


def mrope_axes(half_dim: int, device=None) -> torch.Tensor:
    """The axis (0 temporal, 1 row, 2 column) of each rotary frequency pair: interleaved row, column, temporal from
    the highest frequency down (as Qwen3-VL interleaves), so that rows and columns both get frequencies that tell
    neighbouring cells apart even in a small head (Qwen2-VL's contiguous sections give the column the lowest)."""
    return torch.tensor([1, 2, 0], device=device).repeat(half_dim // 3 + 1)[:half_dim]


def mrope_cos_sin(inv_freq: torch.Tensor, pos_BT3: torch.Tensor):
    """omnigpt.model.transformer.rope_cos_sin with a position per frequency pair: (B, T, 1, h) cos and sin. Where
    the three positions agree (text) the result is bit-identical to rope_cos_sin's."""
    axes = mrope_axes(inv_freq.shape[0], pos_BT3.device)
    freqs = pos_BT3[..., axes].float() * inv_freq  # (B, T, h/2), float32 even under autocast
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().unsqueeze(2), emb.sin().unsqueeze(2)


class RotaryHook:
    """Forward pre-hook on an LM layer: while the VLM has set rotary (cos, sin), the layer uses them instead of the
    1-D ones the Transformer computed. An object, so that copy.deepcopy(vlm) binds the copy's hooks to its state."""

    def __init__(self, rotary: dict):
        self.rotary = rotary

    def __call__(self, layer, args):
        # the Transformer calls each layer as layer(x, cos, sin, mask, cache, pos_BT): rewrite cos and sin only
        now = self.rotary["now"]
        return None if now is None else (args[0], *now) + tuple(args[3:])


class MLPConnector(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, d_out), nn.Linear(d_out, d_out)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class CrossAttention(nn.Module):
    """Queries from x, keys and values from a context; multi-head, SDPA. qk_norm bounds the attention logits (a
    gated cross-attention VLM diverged without it after ~800 steps at lr 5e-4 in bf16: RESULTS.md, run 8)."""

    def __init__(self, d: int, n_heads: int, d_ctx: int | None = None, qk_norm: bool = False, split_kv: bool = False,
                 place_readout: bool = False):
        super().__init__()
        self.n_heads, self.split_kv = n_heads, split_kv  # split_kv: context channels are [key view | value view]
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(d_ctx or d, 2 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        # place_readout: the context's last d // n_heads channels are each item's place, read by every head with its
        # attention and projected by place_out, which starts at zero (VLMConfig.place_readout)
        self.place_out = nn.Linear(d, d, bias=False) if place_readout else None
        if self.place_out is not None:
            nn.init.zeros_(self.place_out.weight)
        self.q_norm = RMSNorm(d // n_heads) if qk_norm else None
        self.k_norm = RMSNorm(d // n_heads) if qk_norm else None

    def heads(self, x_BTD, ctx_BSD):
        """Per-head queries (B, K, T, h), keys and values (B, K, S, h)."""
        B, T, D = x_BTD.shape
        K, h = self.n_heads, D // self.n_heads
        if self.place_out is not None:
            ctx_BSD = ctx_BSD[..., :-h]
        q = self.q(x_BTD).view(B, T, K, h)
        if self.split_kv:  # two views of the same places: keys from one, values from the other
            (w_k, w_v), (key_view, value_view) = self.kv.weight.chunk(2), ctx_BSD.chunk(2, dim=-1)
            k, v = F.linear(key_view, w_k).view(B, -1, K, h), F.linear(value_view, w_v).view(B, -1, K, h)
        else:
            k, v = self.kv(ctx_BSD).view(B, -1, 2, K, h).unbind(2)
        if self.q_norm is not None:
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x_BTD, ctx_BSD, mask_BTS=None):
        B, T, D = x_BTD.shape
        q, k, v = self.heads(x_BTD, ctx_BSD)
        mask = None if mask_BTS is None else mask_BTS.unsqueeze(-3)  # (B, T, S) or (T, S): one for all heads
        y = self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, D))
        if self.place_out is not None:
            place = ctx_BSD[..., -q.shape[-1]:].to(q.dtype).unsqueeze(1).expand(-1, self.n_heads, -1, -1)
            where = F.scaled_dot_product_attention(q, k, place, attn_mask=mask)
            y = y + self.place_out(where.transpose(1, 2).reshape(B, T, D))
        return y


class ResamplerLayer(nn.Module):
    def __init__(self, d: int, n_heads: int, qk_norm: bool = False):
        super().__init__()
        self.norm_x, self.norm_l = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CrossAttention(d, n_heads, qk_norm=qk_norm)
        self.mlp_norm, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, lat_NLD, x_NPD, mask_LS=None):
        lat_n = self.norm_l(lat_NLD)
        lat_NLD = lat_NLD + self.attn(lat_n, torch.cat([self.norm_x(x_NPD), lat_n], dim=1), mask_LS)  # Flamingo: kv = [x; latents]
        return lat_NLD + self.mlp(self.mlp_norm(lat_NLD))


def window_mask(grid: int, latent_grid: int, halo: int = 0, see_all: bool = False) -> torch.Tensor:
    """(L, P + L) bool for a resampler whose L = g*g latents sit on a grid over the grid x grid patches: latent
    (i, j) sees the patches of its window (rows i*s .. i*s+s-1, columns j*s .., s = grid / g) and itself; with a
    halo h, the windows of cells up to h rows and columns away too (overlapping windows: a latent at an object's
    edge sees the whole object, and stays centred on its own place); with see_all, every latent (each place can
    learn from the others what it is part of, and still reads pixels only in its window)."""
    s, g = grid // latent_grid, latent_grid
    cell = torch.arange(grid) // s  # the latent row (column) of each patch row (column)
    near = (cell[None, :] - torch.arange(g)[:, None]).abs() <= halo  # (g, grid): latent row i sees patch row r
    sees = (near[:, None, :, None] & near[None, :, None, :]).reshape(g * g, grid * grid)
    latents = torch.ones(g * g, g * g, dtype=torch.bool) if see_all else torch.eye(g * g, dtype=torch.bool)
    return torch.cat([sees, latents], dim=1)


class Resampler(nn.Module):
    """Perceiver resampler (Flamingo): L learned latents cross-attend to an image's patch tokens -> (N, L, d_out).
    With a grid (the patch grid; L a square), each latent reads only its window of patches, so the L outputs are a
    grid of places (as Honeybee's locality-preserving projectors argue for spatial questions) that grounding
    labels can name. With both_views, it runs twice, with and without the halo, and returns (N, L, 2 d_out):
    [the wide view | the place's own window], for cross-attention that finds by the one and reads the other.
    With window_queries, a grid latent starts from the mean of its own window's patches (TokenPacker's point queries)
    instead of a constant: a constant query weighs the patches of a halo by their keys alone, the same for every
    place, so a latent next to two objects mixes both; a query that already holds its own place's content can
    prefer the patches that match it."""

    def __init__(self, d_in: int, d_out: int, n_latents: int, n_layers: int, n_heads: int, grid: int | None = None,
                 qk_norm: bool = False, halo: int = 0, both_views: bool = False, see_all: bool = False,
                 window_queries: bool = False):
        super().__init__()
        self.proj_in = nn.Linear(d_in, d_out)
        self.latents = nn.Parameter(torch.randn(n_latents, d_out) * 0.02)
        self.layers = nn.ModuleList(ResamplerLayer(d_out, n_heads, qk_norm) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_out)
        mask = window_mask(grid, math.isqrt(n_latents), halo, see_all) if grid else None
        self.register_buffer("mask_LS", mask, persistent=False)
        own = window_mask(grid, math.isqrt(n_latents), see_all=see_all) if both_views else None
        self.register_buffer("own_LS", own, persistent=False)
        pool = None
        if window_queries:  # (L, P): each latent's mean over the patches of its own window
            sees = window_mask(grid, math.isqrt(n_latents))[:, : grid * grid].float()
            pool = sees / sees.sum(1, keepdim=True)
        self.register_buffer("pool_LP", pool, persistent=False)

    def forward(self, x_NPV):
        x_NPD = self.proj_in(x_NPV)
        out = self.read(x_NPD, self.mask_LS)
        return out if self.own_LS is None else torch.cat([out, self.read(x_NPD, self.own_LS)], dim=-1)

    def read(self, x_NPD, mask_LS):
        lat_NLD = self.latents.expand(x_NPD.shape[0], -1, -1).to(x_NPD.dtype)
        if self.pool_LP is not None:
            lat_NLD = lat_NLD + self.pool_LP.to(x_NPD.dtype) @ x_NPD
        for layer in self.layers:
            lat_NLD = layer(lat_NLD, x_NPD, mask_LS)
        return self.norm(lat_NLD)


class GatedCrossBlock(nn.Module):
    """Flamingo's GATED XATTN-DENSE: x += tanh(a) * xattn(x, media); x += tanh(b) * ffw(x); a = b = 0 at init."""

    def __init__(self, cfg: ModelConfig, n_heads: int, qk_norm: bool = False, split_kv: bool = False,
                 place_readout: bool = False):
        super().__init__()
        d = cfg.d_model
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.attn = CrossAttention(d, n_heads, qk_norm=qk_norm, split_kv=split_kv, place_readout=place_readout)
        self.mlp_norm, self.mlp = RMSNorm(d, cfg.norm_eps), SwiGLU(d, cfg.d_ff)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x_BTD, media: MediaContext | None):
        if media is not None:
            # a token that sees no image would attend over nothing (NaN): let it see all, then zero its output
            mask = media.visible_BTQ | ~media.any_BT1
            y = self.attn(self.attn_norm(x_BTD), media.media_BQD.to(x_BTD.dtype), mask) * media.any_BT1
            x_BTD = x_BTD + torch.tanh(self.attn_gate).to(x_BTD.dtype) * y
        return x_BTD + torch.tanh(self.mlp_gate).to(x_BTD.dtype) * self.mlp(self.mlp_norm(x_BTD))


@dataclass
class MediaContext:
    media_BQD: torch.Tensor  # each row's image latents, images padded to M
    visible_BTQ: torch.Tensor  # bool: token t may attend to media token q
    any_BT1: torch.Tensor  # bool: token t sees at least one image


def image_positions(ids_BT: torch.Tensor, image_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each image sits: (row_N, slot_N (index of the image in its row), pos_N (its token's column))."""
    rows, cols = (ids_BT == image_id).nonzero(as_tuple=True)  # row-major: images in order
    counts = torch.bincount(rows, minlength=ids_BT.shape[0])
    starts = torch.cumsum(counts, 0) - counts
    slots = torch.arange(len(rows), device=ids_BT.device) - starts[rows]
    return rows, slots, cols


def row_media(ids_BT: torch.Tensor, feats_NLD: torch.Tensor, image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images gathered per row: media (B, M*L, D) and each image's token position img_pos (B, M), padding at +inf."""
    rows, slots, cols = image_positions(ids_BT, image_id)
    if len(rows) != len(feats_NLD):
        raise ValueError(f"{len(rows)} <|image|> tokens in the text but {len(feats_NLD)} images")
    B, (N, L, D) = ids_BT.shape[0], feats_NLD.shape
    M = int(slots.max()) + 1 if N else 0
    media = feats_NLD.new_zeros(B, M, L, D)
    media[rows, slots] = feats_NLD
    img_pos = torch.full((B, M), torch.iinfo(torch.long).max, dtype=torch.long, device=ids_BT.device)
    img_pos[rows, slots] = cols
    return media.view(B, M * L, D), img_pos


def media_context(media_BQD: torch.Tensor, img_pos_BM: torch.Tensor, pos_BT: torch.Tensor, L: int) -> MediaContext:
    """Token at position p sees the latents of every image whose token is at a position <= p."""
    visible_BTM = img_pos_BM.unsqueeze(1) <= pos_BT.unsqueeze(-1)
    visible_BTQ = visible_BTM.repeat_interleave(L, dim=-1)
    return MediaContext(media_BQD, visible_BTQ, visible_BTM.any(-1, keepdim=True))


def splice(x_BTD: torch.Tensor, ids_BT: torch.Tensor, feats_NLD: torch.Tensor, image_id: int) -> torch.Tensor:
    """Replace the `<|image|>` embeddings, in order, by the images' vectors (inline fusion)."""
    where_BT = ids_BT == image_id
    n, (N, L, _) = int(where_BT.sum()), feats_NLD.shape
    if n != N * L:
        raise ValueError(f"{n} <|image|> placeholders in the text but {N} images x {L} tokens each = {N * L}")
    return x_BTD.masked_scatter(where_BT.unsqueeze(-1), feats_NLD.to(x_BTD.dtype))


def text_only_targets(targets_BT: torch.Tensor | None, image_id: int) -> torch.Tensor | None:
    return None if targets_BT is None else targets_BT.masked_fill(targets_BT == image_id, IGNORE)


# ---- the model ---------------------------------------------------------------------------------------------------
class CrossHook:
    """Forward pre-hook on an LM layer: runs a gated cross-attention block on the layer's input first. An object
    (not a closure), so that copy.deepcopy(vlm) gives hooks bound to the copy's blocks and media."""

    def __init__(self, block: GatedCrossBlock, media: dict):
        self.block, self.media = block, media

    def __call__(self, layer, args):
        # the Transformer calls each layer as layer(x, cos, sin, mask, cache, pos_BT): rewrite x only
        return (self.block(args[0], self.media["now"]),) + tuple(args[1:])


class GroundHook:
    """Forward hook that keeps, while grounding targets are given (VLM.forward), an LM layer's output (inline) or
    the inputs (x, media) of a gated cross-attention block (cross)."""

    def __init__(self, store: dict, key: str = "x"):
        self.store, self.key = store, key

    def __call__(self, module, args, out):
        if self.store.get("on"):
            if isinstance(module, GatedCrossBlock):
                self.store[self.key] = args
            else:
                self.store[self.key] = out[0] if isinstance(out, tuple) else out  # (x, MoE aux) or x


def first_image_labels(ids_BT: torch.Tensor, image_id: int, cells_BG: torch.Tensor) -> torch.Tensor:
    """(B, T) grounding labels at the placeholders of each row's first image (cells_BG in reading order), IGNORE
    elsewhere (inline fusion: an image's tokens are its grid cells)."""
    where = ids_BT == image_id
    k = where.cumsum(1) - 1
    first = where & (k < cells_BG.shape[1])
    labels = cells_BG.gather(1, k.clamp(0, cells_BG.shape[1] - 1))
    return torch.where(first, labels, torch.full_like(labels, IGNORE))


def pointer_loss(logits_BKTQ: torch.Tensor, visible_BTQ: torch.Tensor, cells_BG: torch.Tensor,
                 points: list[tuple[int, int, torch.Tensor]], offset: int = 0) -> torch.Tensor:
    """Cross fusion's grounding loss. Each point (head h, object k, where_BT) asks head h of the grounded block to
    put its attention, at the positions where_BT, on the latents (the first image's grid cells, media tokens
    offset .. offset + G) of the question's k-th named object: mean over (row, position, point) of -log(attention
    mass on those cells). Rows whose question names no k-th object are left out."""
    # a finite "minus infinity": rows that see nothing (text before the image) stay finite, not NaN, in both passes;
    # and no boolean indexing or .item(), so a training step never waits for the GPU here
    G, neg = cells_BG.shape[1], torch.finfo(torch.float32).min
    logp = logits_BKTQ.float().masked_fill(~visible_BTQ.unsqueeze(1), neg).log_softmax(-1)[..., offset:offset + G]
    terms, n = logp.new_zeros(()), logp.new_zeros(())
    for h, k, where_BT in points:
        target_BG = cells_BG == k
        use_BT = where_BT & target_BG.any(1, keepdim=True)
        mass_BT = logp[:, h].masked_fill(~target_BG.unsqueeze(1), neg).logsumexp(-1)
        terms = terms - torch.where(use_BT, mass_BT, 0.0).sum()
        n = n + use_BT.sum()
    return terms / n.clamp(min=1)


def pointer_rows(logits_BKTQ: torch.Tensor, visible_BTQ: torch.Tensor, cells_BG: torch.Tensor,
                 points: list[tuple[int, int, torch.Tensor]], offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, over pointer_loss's points (head h at the positions where_BT, on the k-th named object's cells among
    media offset .. offset + G): (hit_B: at every point the head's strongest visible latent of the look is one of
    those cells, mass_B: the mean share of the head's attention, over all visible media, that lands on them,
    tried_B: the row has a point). Mass is what the head's read value is made of; a hit alone can hide an attention
    spread over the other objects."""
    G = cells_BG.shape[1]
    logits = logits_BKTQ.float().masked_fill(~visible_BTQ.unsqueeze(1), float("-inf"))
    probs = logits.softmax(-1).nan_to_num(0.0)[..., offset:offset + G]  # a position that sees no media reads nothing
    logits = logits[..., offset:offset + G]
    B = cells_BG.shape[0]
    hit_B = torch.ones(B, dtype=torch.bool, device=cells_BG.device)
    mass_B = torch.zeros(B, device=cells_BG.device)
    n_B = torch.zeros(B, device=cells_BG.device)
    for h, k, where_BT in points:
        target_BG = cells_BG == k
        use_BT = where_BT & target_BG.any(1, keepdim=True)
        on_target_BT = target_BG.gather(1, logits[:, h].argmax(-1))
        hit_B &= (on_target_BT | ~use_BT).all(1)
        mass_BT = (probs[:, h] * target_BG[:, None].to(probs.dtype)).sum(-1)
        mass_B += (mass_BT * use_BT).sum(1)
        n_B += use_BT.sum(1)
    tried_B = n_B > 0
    return hit_B & tried_B, mass_B / n_B.clamp(min=1), tried_B


def pointer_targets(pointer: str, ground) -> list[tuple[int, int, torch.Tensor]]:
    """What cross fusion's pointer heads learn (pointer_loss's points). answer: at every position of the answer,
    head 0 points at the first named object and head 1 at the second. mention: at the last word of the phrase that
    names an object ("... the red *star* ..."), head 0 points at that object; with the images first, the question's
    own words then carry what they name, and the answer reads them like any earlier word."""
    points = []
    if pointer in ("answer", "both"):
        points += [(0, 1, ground.answer_BT), (1, 2, ground.answer_BT)]
    if pointer in ("mention", "both"):
        points += [(0, 1, ground.mention_BT == 1), (0, 2, ground.mention_BT == 2)]
    return points


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig, vision: ViT | None = None, lm: Transformer | None = None):
        super().__init__()
        self.cfg = cfg
        self.vision = vision if vision is not None else ViT(cfg.vision)
        self.lm = lm if lm is not None else Transformer(cfg.text)
        V, D = cfg.vision.d_model, cfg.text.d_model
        if cfg.uses_resampler:
            self.connector = Resampler(V, D, cfg.n_latents, cfg.resampler_layers, cfg.resampler_heads,
                                       grid=cfg.vision.grid if cfg.resampler_grid else None, qk_norm=cfg.qk_norm,
                                       halo=cfg.resampler_halo, both_views=cfg.halo_keys_only or cfg.two_hop,
                                       see_all=cfg.latents_see_all, window_queries=cfg.window_queries)
        else:
            self.connector = MLPConnector(V * cfg.pixel_shuffle ** 2, D)
        split_kv = cfg.halo_keys_only or not cfg.pos_lm_keys
        self.xattn = nn.ModuleDict({str(i): GatedCrossBlock(cfg.text, cfg.text.n_heads, cfg.qk_norm, split_kv,
                                                            cfg.place_readout) for i in cfg.cross_layers()})
        self._media = {"now": None}  # what the cross-attention blocks see during the current LM call
        for i in cfg.cross_layers():
            self.lm.layers[i].register_forward_pre_hook(CrossHook(self.xattn[str(i)], self._media))
        P = cfg.pos_lm_dims or D  # the channels a place takes
        if cfg.pos_lm and cfg.pos_lm_fixed:  # the places of the image tokens (or grid latents), fixed, in the LM's width
            self.register_buffer("pos_fixed", sincos_2d(cfg.ground_grid, cfg.ground_grid, P), persistent=False)
        elif cfg.place_readout:  # each grid latent's place, one head's width, read beside the values (CrossAttention)
            h = D // cfg.text.n_heads
            self.register_buffer("pos_fixed", sincos_2d(cfg.ground_grid, cfg.ground_grid, h), persistent=False)
        elif cfg.pos_lm:  # learned row and column embeddings of the image tokens (or grid latents), in the LM's width
            gh = gw = cfg.ground_grid
            self.pos_rows, self.pos_cols = nn.Parameter(torch.zeros(gh, P)), nn.Parameter(torch.zeros(gw, P))
        self._ground: dict = {}  # what the grounding loss reads during the current call
        if cfg.ground_layer is not None and cfg.fusion == "inline":
            self.ground_head = nn.Linear(D, 3)  # neither / first / second object the question names
            self.lm.layers[cfg.ground_layer].register_forward_hook(GroundHook(self._ground))
        elif cfg.ground_layer is not None:  # cross: the block after the layer, whose heads 0 and 1 point at the objects
            self.xattn[str(cfg.ground_layer + 1)].register_forward_hook(GroundHook(self._ground))
            if cfg.two_hop:  # ... and the next block, whose heads 0 and 1 look again, on the narrow view
                self.xattn[str(cfg.ground_layer + 2)].register_forward_hook(GroundHook(self._ground, "x2"))
        self._rotary = {"now": None}  # M-RoPE (cos, sin) the LM's layers use during the current call
        if cfg.mrope:
            for layer in self.lm.layers:
                layer.register_forward_pre_hook(RotaryHook(self._rotary))

    @contextlib.contextmanager
    def attending(self, media: MediaContext | None):
        """Make `media` what the cross-attention blocks see during LM calls inside this block."""
        self._media["now"] = media
        try:
            yield
        finally:
            self._media["now"] = None

    @contextlib.contextmanager
    def rotary(self, ids_BT: torch.Tensor, pos_BT: torch.Tensor):
        """With mrope, LM calls inside this block rotate by mrope_positions(ids_BT, pos_BT) (the tokens and
        positions of that call); without, nothing changes."""
        if not self.cfg.mrope:
            yield
            return
        pos_BT3 = mrope_positions(ids_BT, pos_BT, self.cfg.image_id, self.cfg.token_grid)
        self._rotary["now"] = mrope_cos_sin(self.lm.inv_freq, pos_BT3)
        try:
            yield
        finally:
            self._rotary["now"] = None

    def encode_images(self, pixels_NCHW: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) normalised pixels -> (N, L, D) vectors in the LM's width."""
        tokens, grid = self.vision.patch_tokens(pixels_NCHW, self.cfg.feature_layer)
        if self.cfg.pos2d:  # where each patch is, explicitly: left/right/above/below questions compare these
            pos = sincos_2d(*grid, tokens.shape[-1], tokens.device)
            tokens = tokens + (pos if self.cfg.pos2d_scale == 1.0 else pos * self.cfg.pos2d_scale).to(tokens.dtype)
        if not self.cfg.uses_resampler:
            tokens = pixel_shuffle(tokens, grid, self.cfg.pixel_shuffle)
        out = self.connector(tokens)
        if self.cfg.two_hop:  # (N, L, [wide | narrow]) -> (N, 2L, D): the L wide latents, then the L narrow ones
            out = torch.cat(out.chunk(2, dim=-1), dim=1)
        if self.cfg.pos_lm:  # a grid latent's place, explicitly: the values cross-attention reads then say where it is
            pos = self.pos_fixed if self.cfg.pos_lm_fixed else (self.pos_rows[:, None] + self.pos_cols[None, :]).flatten(0, 1)
            pos = (pos.repeat(2, 1) if self.cfg.two_hop else pos).to(out.dtype)
            P = self.cfg.pos_lm_dims
            placed = torch.cat([out[..., :-P], pos.expand(out.shape[0], -1, -1)], dim=-1) if P else out + pos
            out = placed if self.cfg.pos_lm_keys else torch.cat([out, placed], dim=-1)  # keys read out, values placed
        elif self.cfg.place_readout:  # (N, Q, D [| D]) -> (N, Q, D [| D] | h): each latent's place rides along
            pos = (self.pos_fixed.repeat(2, 1) if self.cfg.two_hop else self.pos_fixed).to(out.dtype)
            out = torch.cat([out, pos.expand(out.shape[0], -1, -1)], dim=-1)
        return out

    def forward(self, ids_BT: torch.Tensor, targets_BT: torch.Tensor | None = None,
                pixels_NCHW: torch.Tensor | None = None, ground=None) -> ModelOutput:
        """Next-token logits and, given targets, the text-only loss. Images, in order of their placeholders.
        Given ground (omnigpt.data.vision_samples.Grounding: each grounded row's first image's cells labelled with
        the objects its question names, and the positions of its answer), also the grounding loss
        (out.ground_loss; not part of out.loss, the caller weighs it)."""
        if ground is not None:
            if self.cfg.ground_layer is None:
                raise ValueError("grounding targets given but the VLM has no grounding loss (VLMConfig.ground_layer)")
            out, seen = self.forward_seen(ids_BT, targets_BT, pixels_NCHW)
            return dataclasses.replace(out, ground_loss=self.ground_loss(ids_BT, seen, ground))
        feats = self.encode_images(pixels_NCHW) if pixels_NCHW is not None and len(pixels_NCHW) else None
        targets_BT = text_only_targets(targets_BT, self.cfg.image_id)
        if self.cfg.fusion == "inline":
            x_BTD = self.lm.embed(ids_BT)
            if feats is not None:
                x_BTD = splice(x_BTD, ids_BT, feats, self.cfg.image_id)
            elif bool((ids_BT == self.cfg.image_id).any()):
                raise ValueError("the text has <|image|> placeholders but no images were given")
            with self.rotary(ids_BT, torch.arange(ids_BT.shape[1], device=ids_BT.device).expand_as(ids_BT)):
                return self.lm(None, targets_BT, embeds_BTD=x_BTD)
        media = None
        if feats is not None:
            media_BQD, img_pos_BM = row_media(ids_BT, feats, self.cfg.image_id)
            pos_BT = torch.arange(ids_BT.shape[1], device=ids_BT.device).expand_as(ids_BT)
            media = media_context(media_BQD, img_pos_BM, pos_BT, self.cfg.tokens_per_image)
        with self.attending(media):
            return self.lm(ids_BT, targets_BT)

    def forward_seen(self, ids_BT, targets_BT, pixels_NCHW):
        """(forward's output, what the grounded layer saw: its output (inline), the grounded block's inputs (x,
        media) (cross), or with two_hop the inputs of both looks' blocks)."""
        self._ground.update(on=True, x=None, x2=None)
        try:
            out = self.forward(ids_BT, targets_BT, pixels_NCHW)
        finally:
            self._ground["on"] = False
        seen = self._ground["x"] if not self.cfg.two_hop else (self._ground["x"], self._ground["x2"])
        self._ground.update(x=None, x2=None)
        return out, seen

    def ground_loss(self, ids_BT: torch.Tensor, seen, ground) -> torch.Tensor:
        if self.cfg.fusion == "inline":  # each image token says which named object it shows (or none)
            logits = self.ground_head(seen).float()
            labels_BT = first_image_labels(ids_BT, self.cfg.image_id, ground.cells_BG)
            return F.cross_entropy(logits.flatten(0, 1), labels_BT.flatten(), ignore_index=IGNORE)
        looks = self.pointer_looks(seen)
        points = pointer_targets(self.cfg.pointer, ground)
        return sum(pointer_loss(logits, visible, ground.cells_BG, points, offset) for logits, visible, offset in looks) / len(looks)

    def pointer_looks(self, seen) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Cross fusion: per look, (the pointer heads' attention logits (B, 2, T, Q), visible_BTQ, the media offset
        of the latents it is taught on). The grounded block's attention from the answer to the named objects'
        latents; with two_hop, the first look on the wide latents (media 0 .. G) and the second, one block later,
        on the narrow ones (G .. 2G)."""
        looks = [(seen, self.cfg.ground_layer + 1, 0)] if not self.cfg.two_hop else \
            [(seen[0], self.cfg.ground_layer + 1, 0), (seen[1], self.cfg.ground_layer + 2, self.cfg.n_latents)]
        out = []
        for (x_BTD, media), layer, offset in looks:
            if media is None:
                raise ValueError("grounding targets given for a batch without images")
            block = self.xattn[str(layer)]
            q, k, _ = block.attn.heads(block.attn_norm(x_BTD), media.media_BQD.to(x_BTD.dtype))
            logits = (q[:, :2] @ k[:, :2].transpose(-1, -2)) * q.shape[-1] ** -0.5  # heads 0 and 1, as SDPA scales them
            out.append((logits, media.visible_BTQ, offset))
        return out

    def require_pointer(self) -> None:
        if self.cfg.fusion != "cross" or self.cfg.ground_layer is None:
            raise ValueError("pointer diagnostics need a cross-attention VLM with a grounded block (VLMConfig.ground_layer)")

    @torch.no_grad()
    def pointer_report(self, ids_BT: torch.Tensor, pixels_NCHW: torch.Tensor, ground, targets_BT: torch.Tensor) -> dict:
        """Cross fusion, a diagnostic of what the pointer heads find, with the answers given (teacher forcing): per
        row, "looks": [pointer_rows' (hit_B, mass_B, tried_B) of each look], and "right_B": every answer token is the
        model's top prediction. Right against hit tells a wrong answer's causes apart: the wrong object found, or
        the right one found and misread."""
        self.require_pointer()
        out, seen = self.forward_seen(ids_BT, None, pixels_NCHW)
        targets_BT = text_only_targets(targets_BT, self.cfg.image_id)
        learn_BT = targets_BT != IGNORE
        right_B = ((out.logits.argmax(-1) == targets_BT) | ~learn_BT).all(1) & learn_BT.any(1)
        points = pointer_targets(self.cfg.pointer, ground)
        return {"looks": [pointer_rows(logits, visible, ground.cells_BG, points, offset)
                          for logits, visible, offset in self.pointer_looks(seen)], "right_B": right_B}

    # -- training helpers ------------------------------------------------------------------------------------
    def parts(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part, for staged training: vision, connector (resampler, cross-attention blocks too), lm."""
        pos = ([self.pos_rows, self.pos_cols] if self.cfg.pos_lm and not self.cfg.pos_lm_fixed else []) + (
            list(self.ground_head.parameters()) if hasattr(self, "ground_head") else [])
        return {"vision": list(self.vision.parameters()),
                "connector": list(self.connector.parameters()) + list(self.xattn.parameters()) + pos,
                "lm": list(self.lm.parameters())}

    def set_trainable(self, parts: tuple[str, ...]) -> None:
        unknown = set(parts) - {"vision", "connector", "lm"}
        if unknown:
            raise ValueError(f"unknown parts {sorted(unknown)}: choose from vision, connector, lm")
        for name, params in self.parts().items():
            for p in params:
                p.requires_grad_(name in parts)


# ---- generation --------------------------------------------------------------------------------------------------
class _ImagePrompted:
    """Looks like a Transformer to `omnigpt.infer.generate`: the prefill sees the images (spliced inline, or as
    cross-attention media), every later decode step is the plain KV-cache step."""

    def __init__(self, vlm: VLM, feats_NLD: torch.Tensor | None):
        self.vlm, self.feats, self.cfg = vlm, feats_NLD, vlm.lm.cfg
        self.prefilled = False
        self.media = None  # cross: (media_BQD, img_pos_BM)

    def head_weight(self):
        return self.vlm.lm.head_weight()

    def __call__(self, tokens_BT, pos_BT=None, cache=None):
        lm, vcfg = self.vlm.lm, self.vlm.cfg
        first, self.prefilled = not self.prefilled, True
        if vcfg.fusion == "inline":
            if first and self.feats is not None:  # the prefill: images spliced in, at M-RoPE positions with mrope
                x = splice(lm.embed(tokens_BT), tokens_BT, self.feats, vcfg.image_id)
                with self.vlm.rotary(tokens_BT, pos_BT):
                    return lm(None, embeds_BTD=x, pos_BT=pos_BT, cache=cache)
            return lm(tokens_BT, pos_BT=pos_BT, cache=cache)  # text only: M-RoPE is 1-D RoPE
        if first and self.feats is not None:
            self.media = row_media(tokens_BT, self.feats, vcfg.image_id)  # prefill: token column == position
        ctx = media_context(*self.media, pos_BT, vcfg.tokens_per_image) if self.media is not None else None
        with self.vlm.attending(ctx):
            return lm(tokens_BT, pos_BT=pos_BT, cache=cache)


@torch.no_grad()
def generate_vlm(vlm: VLM, prompts: list[list[int]], pixels_NCHW: torch.Tensor | None, params=None, *,
                 eos_ids: tuple[int, ...] = (), decode=None, vocab_size: int | None = None):
    """omnigpt.infer.generate with images: pixels are all prompts' images, in order of their placeholders.
    vocab_size: sample only ids below it (as generate does)."""
    from omnigpt.infer.generate import generate
    from omnigpt.infer.sampling import SamplingParams

    feats = vlm.encode_images(pixels_NCHW) if pixels_NCHW is not None and len(pixels_NCHW) else None
    return generate(_ImagePrompted(vlm, feats), prompts, params or SamplingParams(temperature=0.0),
                    eos_ids=eos_ids, decode=decode, vocab_size=vocab_size)


# ---- files -------------------------------------------------------------------------------------------------------
CONFIG_KEY = "omnigpt_vlm"


def save_vlm(vlm: VLM, out_dir: str | os.PathLike, tokenizer=None, extra: dict | None = None) -> Path:
    """model.safetensors + config.json ({"omnigpt_vlm": VLMConfig}) + tokenizer/ when given."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in vlm.state_dict().items()}
    save_file(state, str(out / "model.safetensors.tmp"), metadata={"format": "pt", "omnigpt": "vlm"})
    os.replace(out / "model.safetensors.tmp", out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({CONFIG_KEY: vlm.cfg.to_dict(), **(extra or {})}, indent=2))
    if tokenizer is not None:
        tokenizer.save(str(out / "tokenizer"))
    return out


def load_vlm(path: str | os.PathLike, device: str | torch.device = "cpu") -> VLM:
    from safetensors.torch import load_file

    from omnigpt.model.weights import load_state_dict_checked

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    if CONFIG_KEY not in raw:
        raise ValueError(f"{path}: config.json has no {CONFIG_KEY!r} (not an omnigpt vision-language checkpoint)")
    vlm = VLM(VLMConfig.from_dict(raw[CONFIG_KEY]))
    load_state_dict_checked(vlm, load_file(str(path / "model.safetensors")), source=str(path))
    return vlm.to(device)
