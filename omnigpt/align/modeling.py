"""Models of the alignment stages and the per-token quantities they need.

A policy is a plain `Transformer`. A reward or value model is the same Transformer with its output head swapped for
a scalar one: `lm_head = Linear(d_model, 1)`, so `model(ids).logits` is (B, T, 1), one number per position. Nothing
else changes, so FSDP2 wrapping, checkpoints and the forward pass are the pretraining ones. On disk a scalar model is
an ordinary model folder whose config.json says `"align": {"head": "scalar"}`.

Shape legend: B rows, T sequence positions, R response tokens, V vocabulary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from omnigpt.config import ModelConfig
from omnigpt.model.transformer import Transformer
from omnigpt.model.weights import CONFIG_NAME, WEIGHTS_NAME, load_model, load_state_dict_checked, read_config
from omnigpt.serve.checkpoint import TOKENIZER_DIR
from omnigpt.tokenizer.text import META_FILE, load_tokenizer

from omnigpt.align.data import SeqBatch


# ---- finding and loading models --------------------------------------------------------------------------------
def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A model folder, an alignment run folder (its `model/`), or a pretraining run folder (its latest checkpoint)."""
    p = Path(path)
    if (p / CONFIG_NAME).is_file():
        return p
    if (p / "model" / CONFIG_NAME).is_file():
        return p / "model"
    latest = p / "checkpoints" / "latest"
    if latest.is_file() and (p / "checkpoints" / latest.read_text().strip() / CONFIG_NAME).is_file():
        return p / "checkpoints" / latest.read_text().strip()
    raise FileNotFoundError(f"{path}: no model here (expected config.json + model.safetensors, a run folder with "
                            f"model/, or a pretraining run with checkpoints/latest)")


def resolve_tokenizer(spec: str | None, model_dir: str | os.PathLike):
    """--tokenizer if given, else the tokenizer saved beside the model (every alignment stage saves one)."""
    if spec:
        return load_tokenizer(spec)
    d = resolve_model_dir(model_dir)
    for cand in (d, d.parent, d.parent.parent):
        for folder in (cand / TOKENIZER_DIR, cand):
            if (folder / META_FILE).is_file():
                return load_tokenizer(str(folder))
    raise ValueError(f"no tokenizer saved with {model_dir}; pass --tokenizer")


def is_scalar(path) -> bool:
    return read_config(resolve_model_dir(path)).get("align", {}).get("head") == "scalar"


def add_scalar_head(model: Transformer) -> Transformer:
    """Replace the LM head by a zero-initialised scalar head (a fresh reward model starts at loss log 2)."""
    model.lm_head = nn.Linear(model.cfg.d_model, 1, bias=False, device=model.embed.weight.device)
    nn.init.zeros_(model.lm_head.weight)
    return model


def load_policy(path) -> Transformer:
    path = resolve_model_dir(path)
    if is_scalar(path):
        raise ValueError(f"{path} is a reward/value model (scalar head), not a policy")
    return load_model(path)


def load_scalar_model(path) -> Transformer:
    path = resolve_model_dir(path)
    if not is_scalar(path):
        raise ValueError(f"{path} has no scalar head: not a reward model (train one with `omnigpt align reward`)")
    cfg = ModelConfig.from_dict(read_config(path)["omnigpt"])
    with torch.device("meta"):
        model = add_scalar_head(Transformer(cfg))
    model = model.to_empty(device="cpu")
    load_state_dict_checked(model, load_file(str(path / WEIGHTS_NAME)), source=str(path / WEIGHTS_NAME))
    return model


def frozen(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def export_model(state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | os.PathLike, tok=None,
                 align: dict | None = None) -> Path:
    """Write a full state dict as a model folder (config.json + model.safetensors, and the tokenizer)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / (WEIGHTS_NAME + ".tmp")), metadata={"format": "pt", "omnigpt": "1"})
    os.replace(out / (WEIGHTS_NAME + ".tmp"), out / WEIGHTS_NAME)
    (out / CONFIG_NAME).write_text(json.dumps({"omnigpt": cfg.to_dict(), "align": align or {}}, indent=2))
    if tok is not None:  # the served-checkpoint layout (omnigpt.serve.checkpoint): `omnigpt serve` loads it as is
        tok.save(str(out / TOKENIZER_DIR))
    return out


# ---- per-token quantities --------------------------------------------------------------------------------------
def response_logits(model: nn.Module, batch: SeqBatch, n_vocab: int | None = None) -> torch.Tensor:
    """(B, R, V) float32 logits predicting each response token; only the first n_vocab ids (the tokenizer's: the
    embedding rows past it are padding that generation never samples)."""
    logits = model(batch.ids).logits[..., :n_vocab]
    return logits.gather(1, batch.index.unsqueeze(-1).expand(-1, -1, logits.shape[-1])).float()


def token_logprobs(logits_BRV: torch.Tensor, tokens_BR: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(logits_BRV.transpose(1, 2), tokens_BR, reduction="none")


def entropy(logits_BRV: torch.Tensor) -> torch.Tensor:
    logp = logits_BRV.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def response_logprobs(model: nn.Module, batch: SeqBatch, n_vocab: int | None = None, temperature: float = 1.0) -> torch.Tensor:
    """(B, R) log-probabilities of the response tokens (zero where mask is 0), at a sampling temperature."""
    return token_logprobs(response_logits(model, batch, n_vocab) / temperature, batch.tokens) * batch.mask


def sequence_logprobs(model: nn.Module, batch: SeqBatch, n_vocab: int | None = None) -> torch.Tensor:
    """(B,) sum of the response tokens' log-probabilities (the assistant tokens only)."""
    return response_logprobs(model, batch, n_vocab).sum(-1)


def scalar_outputs(model: nn.Module, batch: SeqBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """A scalar model's (B, R) values at the states before each response token, and (B,) its score at the last
    token."""
    out = model(batch.ids).logits[..., 0].float()  # (B, T)
    return out.gather(1, batch.index), out.gather(1, batch.last.unsqueeze(1)).squeeze(1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask
