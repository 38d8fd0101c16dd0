"""Model weights on disk: `model.safetensors` (or shards + index) with omnigpt's `config.json` beside them.

Never unpickles: safetensors only. Loading checks every tensor's name and shape and says which one is off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from omnigpt.config import ModelConfig
from omnigpt.model.transformer import Transformer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_model(model: Transformer, out_dir: str | os.PathLike, extra_config: dict | None = None) -> Path:
    """Write weights and config atomically enough for readers: temp names, then rename."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "omnigpt": "1"})
    os.replace(tmp, out / WEIGHTS_NAME)
    cfg = {"omnigpt": model.cfg.to_dict(), **(extra_config or {})}
    (out / (CONFIG_NAME + ".tmp")).write_text(json.dumps(cfg, indent=2))
    os.replace(out / (CONFIG_NAME + ".tmp"), out / CONFIG_NAME)
    return out


def read_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    f = path / CONFIG_NAME
    if not f.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (not an omnigpt checkpoint folder)")
    return json.loads(f.read_text())


def load_state_dict_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """load_state_dict with an error that names the first missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise ValueError(f"{source}: missing tensor {missing[0]!r} (expected shape {tuple(expected[missing[0]].shape)}); {len(missing)} missing in all")
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor {unexpected[0]!r} with shape {tuple(state[unexpected[0]].shape)}; {len(unexpected)} unexpected in all")
    for name, t in expected.items():
        if tuple(state[name].shape) != tuple(t.shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(state[name].shape)}, expected {tuple(t.shape)} for this config")
    model.load_state_dict(state, strict=True)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Transformer:
    path = Path(path)
    raw = read_config(path)
    if "omnigpt" not in raw:
        raise ValueError(f"{path}: config.json is not an omnigpt config (a Hugging Face checkpoint? use `omnigpt convert import`)")
    cfg = ModelConfig.from_dict(raw["omnigpt"])
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME}")
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    load_state_dict_checked(model, load_file(str(weights)), source=str(weights))
    return model.to(device=device, dtype=dtype)
