"""Training checkpoints: everything needed to continue a run exactly, written so that a crash never leaves a
half-written checkpoint as the latest one.

Layout of `OUT/checkpoints/`:

    step_0000400/
        config.json, model.safetensors   the model, loadable on its own (`omnigpt.model.weights.load_model`)
        optimizer.safetensors            optimizer state, whole tensors named "<param>::<key>" (e.g. exp_avg)
        train_state.json                 step, tokens, data position, schedule, train config, world size
        rng_rank00000.json ...           torch (CPU, CUDA), numpy and python RNG states, one file per rank
    latest                               the name of the newest complete checkpoint ("step_0000400")

Nothing is pickled: tensors are safetensors and the rest JSON. Model and optimizer tensors are stored whole (FSDP
shards and expert-parallel slices are gathered on save and re-sliced on load), so a run can resume on a different
number of ranks; only the RNG files are per rank.

Atomicity: a checkpoint is written into `.tmp-step_N/`, every file fsynced, then the folder is renamed to
`step_N/` (one atomic rename) and only after that is `latest` replaced (write `latest.tmp`, fsync, rename).
A crash at any moment leaves either the old `latest` pointing at a complete old checkpoint, or the new one
pointing at a complete new one; leftover `.tmp-*` folders are ignored and removed by the next save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from omnigpt.config import ModelConfig
from omnigpt.model.weights import CONFIG_NAME, WEIGHTS_NAME, read_config
from omnigpt.train.optim import optimizer_list
from omnigpt.train.parallelize import DistInfo, barrier, full_model_state, full_shapes, gather_full, load_full_model_state, shard_like

LATEST = "latest"
OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "train_state.json"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def rng_name(rank: int) -> str:
    return f"rng_rank{rank:05d}.json"


# ---- small atomic-file helpers ---------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening a directory
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1))
    _fsync_file(path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ---- RNG -------------------------------------------------------------------------------------------------------
def rng_state(device: torch.device) -> dict:
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch_cpu": torch.get_rng_state().tolist(),
    }
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch_cpu"], dtype=torch.uint8))
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["torch_cuda"], dtype=torch.uint8), device)


# ---- optimizer state as named whole tensors --------------------------------------------------------------------
def _param_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def full_optimizer_state(optimizer, model, info: DistInfo) -> dict[str, torch.Tensor]:
    """{"<param name>::<state key>": whole tensor on CPU}. Collective (every rank, same order)."""
    names = _param_names(model)
    out = {}
    for opt in optimizer_list(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                name = names[id(p)]
                for key, value in sorted(opt.state.get(p, {}).items()):
                    if not torch.is_tensor(value):
                        value = torch.tensor(value)
                    if key == "step":  # a scalar, the same on every rank
                        out[f"{name}::{key}"] = value.detach().float().cpu().reshape(())
                    else:
                        out[f"{name}::{key}"] = gather_full(name, value, model, info).contiguous()
    return out


def load_optimizer_state(optimizer, model, state: dict[str, torch.Tensor], info: DistInfo, source: str) -> None:
    names = _param_names(model)
    expected = set()
    for opt in optimizer_list(optimizer):
        sd = opt.state_dict()  # gives each parameter's index in the format load_state_dict expects
        new_state = {}
        for group, saved_group in zip(opt.param_groups, sd["param_groups"]):
            for p, index in zip(group["params"], saved_group["params"]):
                name = names[id(p)]
                entries = {k.split("::", 1)[1]: v for k, v in state.items() if k.startswith(name + "::")}
                expected.update(f"{name}::{k}" for k in entries)
                if not entries:
                    raise ValueError(f"{source}: no optimizer state for parameter {name!r} (saved with another --optimizer?)")
                new_state[index] = {k: v if k == "step" else shard_like(name, v, p, model, info) for k, v in entries.items()}
        sd["state"] = new_state
        opt.load_state_dict(sd)
    extra = sorted(set(state) - expected)
    if extra:
        raise ValueError(f"{source}: optimizer state {extra[0]!r} matches no parameter of this run (saved with another --optimizer?)")


# ---- config check ----------------------------------------------------------------------------------------------
def config_differences(saved: dict, cfg: ModelConfig) -> list[str]:
    try:  # through the dataclass, so JSON's lists compare equal to the config's tuples
        saved = ModelConfig.from_dict(saved).to_dict()
    except (TypeError, ValueError) as e:
        return [f"the checkpoint's config does not load ({e})"]
    mine = cfg.to_dict()
    return [f"{k} is {saved.get(k)!r} in the checkpoint but {mine.get(k)!r} in this run"
            for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)]


def check_model_config(path: Path, cfg: ModelConfig) -> None:
    raw = read_config(path)
    if "omnigpt" not in raw:
        raise ValueError(f"{path}: {CONFIG_NAME} is not an omnigpt config")
    diffs = config_differences(raw["omnigpt"], cfg)
    if diffs:
        raise ValueError(f"checkpoint {path} is for another model config: " + "; ".join(diffs))


# ---- save / find / load ----------------------------------------------------------------------------------------
def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint: the one `latest` names, else (a crash between the folder rename and the
    pointer update) the highest-numbered step folder. Folders only get their final name once complete."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / STATE_NAME).is_file():
            return path
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and (p / STATE_NAME).is_file()) if root.is_dir() else []
    return steps[-1] if steps else None


def save_checkpoint(root: str | os.PathLike, step: int, *, model, optimizer, cfg: ModelConfig, train_state: dict,
                    info: DistInfo, keep: int = 3) -> Path:
    """Write checkpoint `step` under root (collective: every rank calls it). Returns its final path."""
    root = Path(root)
    name = step_name(step)
    final, tmp = root / name, root / f".tmp-{name}"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(info)

    model_state = full_model_state(model, info)  # collectives first, on every rank
    optim_state = full_optimizer_state(optimizer, model, info)
    write_json(tmp / rng_name(info.rank), rng_state(info.device))
    if info.is_main:
        save_file(model_state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "omnigpt": "1"})
        _fsync_file(tmp / WEIGHTS_NAME)
        write_json(tmp / CONFIG_NAME, {"omnigpt": cfg.to_dict()})
        save_file(optim_state, str(tmp / OPTIMIZER_NAME), metadata={"omnigpt": "optimizer"})
        _fsync_file(tmp / OPTIMIZER_NAME)
        write_json(tmp / STATE_NAME, {**train_state, "step": step, "world_size": info.world_size})
    barrier(info)

    if info.is_main:
        _fsync_dir(tmp)
        if final.exists():  # a complete checkpoint of this step from before a crash: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        write_text_atomic(root / LATEST, name)
        prune(root, keep)
    barrier(info)
    return final


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` step folders (and always the one `latest` names); drop leftover temporaries."""
    current = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for p in steps[:-keep] if keep > 0 else []:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike, *, model, optimizer, cfg: ModelConfig, info: DistInfo) -> dict:
    """Restore model, optimizer and this rank's RNG from `path`; return the train state (step, data position...)."""
    path = Path(path)
    check_model_config(path, cfg)
    state = load_file(str(path / WEIGHTS_NAME))
    shapes = full_shapes(model)
    for k, shape in shapes.items():  # the config matched, so this only catches a corrupted or foreign file
        if k not in state:
            raise ValueError(f"{path / WEIGHTS_NAME}: missing tensor {k!r}")
        if tuple(state[k].shape) != shape:
            raise ValueError(f"{path / WEIGHTS_NAME}: tensor {k!r} has shape {tuple(state[k].shape)}, expected {shape}")
    load_full_model_state(model, state, info)
    load_optimizer_state(optimizer, model, load_file(str(path / OPTIMIZER_NAME)), info, str(path / OPTIMIZER_NAME))
    rng_file = path / rng_name(info.rank)
    if rng_file.is_file():  # absent when resuming on more ranks than were saved: those ranks keep their seed
        set_rng_state(json.loads(rng_file.read_text()), info.device)
    return json.loads((path / STATE_NAME).read_text())
