"""What `omnigpt serve` loads: a checkpoint folder = save_model's (or save_vlm's) files + a `tokenizer/` subfolder.

    CHECKPOINT/
      config.json          {"omnigpt": ModelConfig, ...extra, optionally "name": "served model id"}
                           or, for a vision-language model, {"omnigpt_vlm": VLMConfig, ...}
      model.safetensors
      tokenizer/           Tokenizer.save (omnigpt_tokenizer.json [+ tokenizer.json])
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from omnigpt.model.multimodal import CONFIG_KEY as VLM_CONFIG_KEY, VLM, load_vlm, save_vlm
from omnigpt.model.transformer import Transformer
from omnigpt.model.weights import read_config, save_model
from omnigpt.tokenizer.text import Tokenizer, load_tokenizer

TOKENIZER_DIR = "tokenizer"
DEFAULT_RUN = Path("runs/speedrun/latest")  # where `omnigpt speedrun` leaves its last model
ENV_CHECKPOINT = "OMNIGPT_CHECKPOINT"


@dataclass
class ServedModel:
    model: Transformer  # the language model; a VLM's own (text-only requests run on it as they are)
    tokenizer: Tokenizer
    name: str  # the id clients pass as `model`
    path: Path
    vlm: VLM | None = None  # a vision-language checkpoint: `model` is vlm.lm; without one, images are refused


def default_checkpoint() -> Path | None:
    """$OMNIGPT_CHECKPOINT, else the speedrun's latest model on this machine, else None."""
    env = os.environ.get(ENV_CHECKPOINT)
    if env:
        return Path(env)
    return DEFAULT_RUN if DEFAULT_RUN.exists() else None


def load_for_serving(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                     name: str | None = None) -> ServedModel:
    from omnigpt.model.weights import load_model

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    resolved = path.resolve()  # `latest` is usually a link: name the model after what it points to
    raw = read_config(resolved)
    tok_dir = resolved / TOKENIZER_DIR
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"{path}: no {TOKENIZER_DIR}/ folder (a served checkpoint needs its tokenizer)")
    tokenizer = load_tokenizer(str(tok_dir))
    vlm = None
    if VLM_CONFIG_KEY in raw:
        vlm = load_vlm(resolved, device=device).eval()
        if dtype is not None:
            vlm = vlm.to(dtype)
        if vlm.cfg.image_id != tokenizer.image_id:
            raise ValueError(f"{path}: the model's image placeholder is id {vlm.cfg.image_id} but the tokenizer's "
                             f"<|image|> is {tokenizer.image_id}")
        model = vlm.lm
    else:
        model = load_model(resolved, device=device, dtype=dtype)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary only "
                         f"{model.cfg.vocab_size}")
    served_name = name or raw.get("name") or resolved.name
    return ServedModel(model=model, tokenizer=tokenizer, name=served_name, path=resolved, vlm=vlm)


def save_for_serving(model: Transformer | VLM, tokenizer: Tokenizer, out_dir: str | os.PathLike,
                     name: str | None = None) -> Path:
    """The inverse of load_for_serving (training jobs and tests use it)."""
    extra = {"name": name} if name else None
    if isinstance(model, VLM):
        return save_vlm(model, out_dir, tokenizer, extra=extra)  # (its tokenizer/ is TOKENIZER_DIR)
    out = save_model(model, out_dir, extra_config=extra)
    tokenizer.save(str(out / TOKENIZER_DIR))
    return out
