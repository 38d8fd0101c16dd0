"""Vision encoder: a ViT, weight-compatible with Hugging Face CLIP and SigLIP vision towers, and a CLIP dual encoder.

Shape legend: B images (or captions), C channels, H W pixels, P tokens of an image (patches, +1 with a class
token), D width, K heads, h head dim, T caption length, E joint embedding width.

The ViT is pre-LayerNorm: patch embedding (a strided convolution), an optional class token, learned position
embeddings (bicubically interpolated when an image has another grid than the one trained, as HF's
`interpolate_pos_encoding` does), blocks of attention + MLP, a final LayerNorm and a pooler:
- "cls" (CLIP): pooled = post_norm(token 0); the returned tokens are NOT post-normed (HF `last_hidden_state`);
- "map" (SigLIP): tokens = post_norm(hidden); pooled = attention pooling with a learned probe;
- "mean": tokens = post_norm(hidden); pooled = their mean (our own CLIP-trained towers); "none": no pooled output.
`vit_from_hf` loads `CLIPVisionModel` / `SiglipVisionModel` weights (a module or a local folder: never the hub).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # CLIP (OpenAI)
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # SigLIP's gelu_pytorch_tanh
}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    image_size: int = 64
    patch_size: int = 8
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    act: str = "gelu_tanh"
    cls_token: bool = False
    patch_bias: bool = True
    pre_norm: bool = False
    pool: str = "mean"  # cls | map | mean | none (see the module docstring)
    norm_eps: float = 1e-6
    n_channels: int = 3
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        for name in ("image_size", "patch_size", "d_model", "n_layers", "n_heads", "d_ff"):
            if getattr(self, name) <= 0:
                raise ValueError(f"invalid VisionConfig: {name}={getattr(self, name)} must be positive")
        if self.d_model % self.n_heads:
            raise ValueError(f"invalid VisionConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"invalid VisionConfig: image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"invalid VisionConfig: act={self.act!r}; choose from {', '.join(ACTIVATIONS)}")
        if self.pool not in ("cls", "map", "mean", "none") or (self.pool == "cls" and not self.cls_token):
            raise ValueError(f"invalid VisionConfig: pool={self.pool!r} (cls needs cls_token=True)")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VisionConfig:
        return cls(**d)


# ---- layers ----------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x_BPD: torch.Tensor, mask=None, is_causal: bool = False) -> torch.Tensor:
        B, P, D = x_BPD.shape
        q, k, v = self.qkv(x_BPD).view(B, P, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, K, P, h) each
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.proj(y.transpose(1, 2).reshape(B, P, D))


class MLP(nn.Module):
    def __init__(self, d: int, d_ff: int, act: str):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(d, d_ff), nn.Linear(d_ff, d), ACTIVATIONS[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, d_ff: int, act: str, eps: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d, eps=eps), Attention(d, n_heads)
        self.norm2, self.mlp = nn.LayerNorm(d, eps=eps), MLP(d, d_ff, act)

    def forward(self, x, mask=None, is_causal: bool = False):
        x = x + self.attn(self.norm1(x), mask, is_causal)
        return x + self.mlp(self.norm2(x))


class MAPHead(nn.Module):
    """Multihead attention pooling (SigLIP): a learned probe attends over the tokens, then a residual MLP."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, cfg.d_model) * 0.02)
        self.attention = nn.MultiheadAttention(cfg.d_model, cfg.n_heads, batch_first=True)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.act)

    def forward(self, x_BPD):
        y = self.attention(self.probe.expand(x_BPD.shape[0], -1, -1), x_BPD, x_BPD, need_weights=False)[0]
        return (y + self.mlp(self.norm(y)))[:, 0]


@dataclass
class VisionOutput:
    tokens: torch.Tensor  # (B, P, D)
    pooled: torch.Tensor | None  # (B, D)
    grid: tuple[int, int]  # patches per column, per row


class ViT(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.patch_embed = nn.Conv2d(cfg.n_channels, D, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)
        self.cls = nn.Parameter(torch.zeros(D)) if cfg.cls_token else None
        self.pos_embed = nn.Parameter(torch.zeros(cfg.grid ** 2 + cfg.cls_token, D))
        self.pre_norm = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.pre_norm else None
        self.blocks = nn.ModuleList(Block(D, cfg.n_heads, cfg.d_ff, cfg.act, cfg.norm_eps) for _ in range(cfg.n_layers))
        self.post_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.head = MAPHead(cfg) if cfg.pool == "map" else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for name, p in self.named_parameters():
            if p.ndim >= 2 or name in ("cls", "pos_embed"):
                nn.init.trunc_normal_(p, std=0.02)
            elif "norm" in name and name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    def position_embeddings(self, gh: int, gw: int) -> torch.Tensor:
        """(P, D) for a gh x gw patch grid: the trained table, or its bicubic interpolation (HF-compatible)."""
        g = self.cfg.grid
        pos = self.pos_embed
        if (gh, gw) == (g, g):
            return pos
        cls, grid_pos = (pos[:1], pos[1:]) if self.cls is not None else (pos[:0], pos)
        grid_pos = grid_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([cls, grid_pos.permute(0, 2, 3, 1).reshape(gh * gw, -1)])

    def embed(self, pixels_BCHW: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.patch_embed(pixels_BCHW.to(self.patch_embed.weight.dtype))  # (B, D, gh, gw)
        gh, gw = x.shape[-2:]
        x_BPD = x.flatten(2).transpose(1, 2)
        if self.cls is not None:
            x_BPD = torch.cat([self.cls.expand(x_BPD.shape[0], 1, -1).to(x_BPD.dtype), x_BPD], dim=1)
        x_BPD = x_BPD + self.position_embeddings(gh, gw)
        if self.pre_norm is not None:
            x_BPD = self.pre_norm(x_BPD)
        return x_BPD, (gh, gw)

    def forward(self, pixels_BCHW: torch.Tensor, n_blocks: int | None = None) -> VisionOutput:
        """n_blocks < n_layers stops early and returns the raw hidden states of that block (no norm, no pooling)."""
        x, grid = self.embed(pixels_BCHW)
        n = len(self.blocks) if n_blocks is None else n_blocks
        for block in self.blocks[:n]:
            x = block(x)
        if n < len(self.blocks):
            return VisionOutput(x, None, grid)
        if self.cfg.pool == "cls":
            return VisionOutput(x, self.post_norm(x[:, 0]), grid)
        x = self.post_norm(x)
        pooled = self.head(x) if self.head is not None else x.mean(1) if self.cfg.pool == "mean" else None
        return VisionOutput(x, pooled, grid)

    def patch_tokens(self, pixels_BCHW: torch.Tensor, layer: int = -1) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, gh*gw, D) patch features (no class token) after block `layer` (-1: the last, -2: the one before...)."""
        n = layer % len(self.blocks) + 1
        out = self(pixels_BCHW, n_blocks=n)
        tokens = out.tokens[:, 1:] if self.cls is not None else out.tokens
        return tokens, out.grid


def preprocess(images, cfg: VisionConfig, size: int | None = None) -> torch.Tensor:
    """PIL images (or HxWx3 uint8 arrays) -> (B, C, S, S) normalised float pixels; S = size or cfg.image_size.
    Images are resized to a square (bicubic) without cropping."""
    import numpy as np
    from PIL import Image

    S = size or cfg.image_size
    arrays = []
    for im in images:
        im = Image.fromarray(np.asarray(im)) if not isinstance(im, Image.Image) else im
        im = im.convert("RGB")
        if im.size != (S, S):
            im = im.resize((S, S), Image.BICUBIC)
        arrays.append(np.asarray(im))
    return normalize(torch.from_numpy(np.stack(arrays)), cfg)


def normalize(images_BHWC: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """uint8 (B, H, W, C) -> normalised float (B, C, H, W) (works on any device)."""
    x = images_BHWC.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(cfg.image_mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.image_std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


# ---- Hugging Face CLIP / SigLIP vision towers --------------------------------------------------------------------
HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def vision_config_from_hf(hf: dict) -> VisionConfig:
    """A CLIP/SigLIP (vision) config dict -> VisionConfig. Full-model configs use their `vision_config`."""
    kind = hf.get("model_type", "")
    d = hf.get("vision_config", hf)
    siglip = "siglip" in kind or "siglip" in d.get("model_type", "")
    if not siglip and "clip" not in kind + d.get("model_type", ""):
        raise ValueError(f"not a CLIP or SigLIP config (model_type={kind!r})")
    if d.get("hidden_act", "quick_gelu") not in HF_ACTS:
        raise ValueError(f"unsupported hidden_act {d.get('hidden_act')!r}")
    return VisionConfig(
        image_size=d.get("image_size", 224), patch_size=d.get("patch_size", 32), d_model=d.get("hidden_size", 768),
        n_layers=d.get("num_hidden_layers", 12), n_heads=d.get("num_attention_heads", 12), d_ff=d.get("intermediate_size", 3072),
        act=HF_ACTS[d.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu")],
        cls_token=not siglip, patch_bias=siglip, pre_norm=not siglip,
        pool=("map" if d.get("vision_use_head", True) else "none") if siglip else "cls",
        norm_eps=d.get("layer_norm_eps", 1e-6 if siglip else 1e-5), n_channels=d.get("num_channels", 3),
        image_mean=(0.5,) * 3 if siglip else CLIP_MEAN, image_std=(0.5,) * 3 if siglip else CLIP_STD,
    )


def vision_state_from_hf(sd: dict[str, torch.Tensor], cfg: VisionConfig) -> dict[str, torch.Tensor]:
    """HF CLIP/SigLIP vision weights -> ViT state dict (q, k, v fused). Keys of a full model's text tower are ignored."""
    if any("vision_model." in k for k in sd):
        sd = {k.split("vision_model.", 1)[1]: v for k, v in sd.items() if "vision_model." in k}
    out = {"patch_embed.weight": sd["embeddings.patch_embedding.weight"],
           "pos_embed": sd["embeddings.position_embedding.weight"],
           "post_norm.weight": sd["post_layernorm.weight"], "post_norm.bias": sd["post_layernorm.bias"]}
    if cfg.patch_bias:
        out["patch_embed.bias"] = sd["embeddings.patch_embedding.bias"]
    if cfg.cls_token:
        out["cls"] = sd["embeddings.class_embedding"]
    if cfg.pre_norm:
        out["pre_norm.weight"], out["pre_norm.bias"] = sd["pre_layrnorm.weight"], sd["pre_layrnorm.bias"]
    for i in range(cfg.n_layers):
        src, dst = f"encoder.layers.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            out[dst + f"attn.qkv.{part}"] = torch.cat([sd[src + f"self_attn.{p}_proj.{part}"] for p in "qkv"])
            out[dst + f"attn.proj.{part}"] = sd[src + f"self_attn.out_proj.{part}"]
            for a, b in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                out[dst + f"{b}.{part}"] = sd[src + f"{a}.{part}"]
    if cfg.pool == "map":
        out["head.probe"] = sd["head.probe"]
        for a, b in (("attention.in_proj_weight", "attention.in_proj_weight"), ("attention.in_proj_bias", "attention.in_proj_bias"),
                     ("attention.out_proj.weight", "attention.out_proj.weight"), ("attention.out_proj.bias", "attention.out_proj.bias"),
                     ("layernorm.weight", "norm.weight"), ("layernorm.bias", "norm.bias"), ("mlp.fc1.weight", "mlp.fc1.weight"),
                     ("mlp.fc1.bias", "mlp.fc1.bias"), ("mlp.fc2.weight", "mlp.fc2.weight"), ("mlp.fc2.bias", "mlp.fc2.bias")):
            out["head." + b] = sd["head." + a]
    return out


def _read_hf_folder(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config = json.loads((path / "config.json").read_text())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (pickled .bin files are not read)")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return config, sd


def vit_from_hf(source) -> ViT:
    """A ViT from an HF CLIP/SigLIP (vision) model object, or from a local folder with config.json + safetensors."""
    from omnigpt.model.weights import load_state_dict_checked

    if isinstance(source, nn.Module):
        config, sd = source.config.to_dict(), source.state_dict()
    else:
        config, sd = _read_hf_folder(Path(source))
    cfg = vision_config_from_hf(config)
    model = ViT(cfg)
    load_state_dict_checked(model, vision_state_from_hf(sd, cfg), source=f"HF {config.get('model_type')} weights")
    return model


# ---- CLIP: a text tower and the contrastive objective --------------------------------------------------------------
@dataclass
class TextTowerConfig:
    vocab_size: int = 512
    max_len: int = 96
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    act: str = "gelu"


class TextTower(nn.Module):
    """CLIP's text encoder: causal transformer over the caption, pooled at its last token."""

    def __init__(self, cfg: TextTowerConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Parameter(torch.randn(cfg.max_len, cfg.d_model) * 0.01)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.act, 1e-5) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        nn.init.normal_(self.tok_embed.weight, std=0.02)

    def forward(self, ids_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        T = ids_BT.shape[1]
        if T > self.cfg.max_len:
            raise ValueError(f"caption of {T} tokens exceeds the text tower's max_len={self.cfg.max_len}")
        x = self.tok_embed(ids_BT) + self.pos_embed[:T]
        for block in self.blocks:
            x = block(x, is_causal=True)
        x = self.norm(x)
        return x[torch.arange(x.shape[0], device=x.device), lengths_B - 1]  # (B, D): the last real token


@dataclass
class CLIPConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    embed_dim: int = 64
    loss: str = "softmax"  # softmax (CLIP, symmetric InfoNCE) | sigmoid (SigLIP)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CLIPConfig:
        return cls(VisionConfig(**d["vision"]), TextTowerConfig(**d["text"]), d["embed_dim"], d.get("loss", "softmax"))


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        if cfg.vision.pool == "none":
            raise ValueError("CLIP needs a pooled image embedding: set vision.pool to cls, map or mean")
        self.cfg = cfg
        self.vision = ViT(cfg.vision)
        self.text = TextTower(cfg.text)
        self.v_proj = nn.Linear(cfg.vision.d_model, cfg.embed_dim, bias=False)
        self.t_proj = nn.Linear(cfg.text.d_model, cfg.embed_dim, bias=False)
        sigmoid = cfg.loss == "sigmoid"
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0 if sigmoid else 1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0 if sigmoid else 0.0), requires_grad=sigmoid)

    def encode_image(self, pixels_BCHW) -> torch.Tensor:
        return F.normalize(self.v_proj(self.vision(pixels_BCHW).pooled), dim=-1)

    def encode_text(self, ids_BT, lengths_B) -> torch.Tensor:
        return F.normalize(self.t_proj(self.text(ids_BT, lengths_B)), dim=-1)

    def forward(self, pixels_BCHW, ids_BT, lengths_B, same_BB: torch.Tensor | None = None):
        """(loss, logits_BB image x text). same_BB marks pairs with identical captions (extra positives)."""
        img_BE, txt_BE = self.encode_image(pixels_BCHW), self.encode_text(ids_BT, lengths_B)
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        logits_BB = scale * img_BE.float() @ txt_BE.float().T + self.logit_bias
        same = same_BB if same_BB is not None else torch.eye(len(img_BE), dtype=torch.bool, device=img_BE.device)
        return (sigmoid_loss if self.cfg.loss == "sigmoid" else softmax_loss)(logits_BB, same), logits_BB


def softmax_loss(logits_BB: torch.Tensor, same_BB: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP); rows with several true captions spread the target over them."""
    target = same_BB.float() / same_BB.float().sum(-1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits_BB, target) + F.cross_entropy(logits_BB.T, target.T))


def sigmoid_loss(logits_BB: torch.Tensor, same_BB: torch.Tensor) -> torch.Tensor:
    """SigLIP: every pair is a binary classification, +1 for matching pairs, -1 otherwise."""
    labels = same_BB.float() * 2 - 1
    return -F.logsigmoid(labels * logits_BB).sum() / len(logits_BB)
