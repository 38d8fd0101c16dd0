"""Hugging Face checkpoints in and out: LlamaForCausalLM, MixtralForCausalLM, Qwen3MoeForCausalLM.

Reads and writes `config.json` + safetensors (one `model.safetensors`, or shards listed in
`model.safetensors.index.json`) directly: no `transformers` needed at run time, and never a pickle.

Tensor names (HF on disk -> omnigpt), layer prefix `model.layers.{i}.` -> `layers.{i}.`:
    self_attn.{q,k,v}_proj.weight        -> attn.wqkv.weight (rows q, then k, then v)
    self_attn.o_proj.weight              -> attn.wo.weight
    self_attn.{q,k}_norm.weight          -> attn.{q,k}_norm.weight       (Qwen3)
    input_layernorm / post_attention_layernorm -> attn_norm / mlp_norm
    mlp.{gate,up}_proj.weight            -> mlp.w_gate_up.weight (gate rows first); mlp.down_proj -> mlp.w_down
    MoE router: mlp.gate.weight (Mixtral legacy: block_sparse_moe.gate.weight) -> mlp.router.gate.weight
    MoE experts, per expert e (what transformers 5 `save_pretrained` writes):
        Qwen3-MoE mlp.experts.{e}.{gate,up,down}_proj.weight; Mixtral block_sparse_moe.experts.{e}.{w1,w3,w2}.weight
      or fused (transformers 5 in memory, `save_pretrained(save_original_format=False)`):
        mlp.experts.gate_up_proj (E, 2F, D) and mlp.experts.down_proj (E, D, F), the same layout as ours
      -> mlp.w_gate_up (E, 2F, D), mlp.w_down (E, D, F)
Export writes the per-expert form, which every transformers version and vLLM load.

Config notes: Mixtral always renormalises its top-k weights (norm_topk=True); Qwen3-MoE layers that are dense
(`mlp_only_layers`, or not on the `decoder_sparse_step`) become `dense_layers` with width `intermediate_size`.
`router_aux_loss_coef` maps to `aux_loss_coef` one to one, but the conventions differ: HF averages the
Switch loss over layers and counts top-k assignments (fractions summing to k), omnigpt sums it over MoE
layers with fractions summing to 1. HF has no router z-loss, so imports set `z_loss_coef=0`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from omnigpt.config import ModelConfig, RopeScaling
from omnigpt.model.transformer import Transformer
from omnigpt.model.weights import load_state_dict_checked

ARCHS = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# HF defaults for keys a config.json may leave out (from the transformers config classes).
DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048),
    "mixtral": dict(rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=131072),
    "qwen3_moe": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=32768),
}
EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}  # gate, up, down
MOE_PREFIXES = {"mixtral": ("block_sparse_moe", "mlp"), "qwen3_moe": ("mlp",)}
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")
INDEX_NAME, WEIGHTS_NAME = "model.safetensors.index.json", "model.safetensors"


# ---- config --------------------------------------------------------------------------------------------------
def _rope_from_hf(hf: dict, arch: str, max_pos: int) -> tuple[float, RopeScaling | None]:
    rp = dict(hf.get("rope_scaling") or {})  # transformers 4 spelling
    rp.update(hf.get("rope_parameters") or {})  # transformers 5 keeps rope_theta in here too
    theta = float(rp.get("rope_theta", hf.get("rope_theta", DEFAULTS[arch]["rope_theta"])))
    if rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("config.json: partial_rotary_factor != 1 is not supported")
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", factor=float(rp["factor"]))
    if kind == "llama3":
        return theta, RopeScaling("llama3", factor=float(rp["factor"]), low_freq_factor=float(rp["low_freq_factor"]),
                                  high_freq_factor=float(rp["high_freq_factor"]),
                                  original_max_seq_len=int(rp.get("original_max_position_embeddings", max_pos)))
    raise ValueError(f"config.json: rope type {kind!r} is not supported (omnigpt has default, linear and llama3)")


def _rope_to_hf(cfg: ModelConfig) -> dict:
    s = cfg.rope_scaling
    if s is None or s.factor == 1.0:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if s.kind == "linear":
        return {"rope_type": "linear", "rope_theta": cfg.rope_theta, "factor": s.factor}
    return {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_seq_len}


def hf_arch(hf: dict) -> str:
    """'llama', 'mixtral' or 'qwen3_moe' from a HF config.json dict, else a ValueError naming what was found."""
    names = hf.get("architectures") or []
    for arch, cls in ARCHS.items():
        if cls in names:
            return arch
    if not names and hf.get("model_type") in ARCHS:
        return hf["model_type"]
    raise ValueError(f"config.json: unsupported architecture {names or hf.get('model_type')!r}; "
                     f"omnigpt converts {', '.join(ARCHS.values())}")


def config_from_hf(hf: dict) -> tuple[str, ModelConfig]:
    """Map a HF config.json dict to (arch, ModelConfig); refuse what omnigpt's model cannot compute."""
    arch = hf_arch(hf)

    def get(key):
        if key not in hf:
            raise ValueError(f"config.json: missing {key!r} (needed for {ARCHS[arch]})")
        return hf[key]

    def refuse(bad: bool, what: str):
        if bad:
            raise ValueError(f"config.json: {what} is not supported by omnigpt's transformer")

    refuse(hf.get("hidden_act", "silu") != "silu", f"hidden_act={hf.get('hidden_act')!r} (only silu)")
    refuse(bool(hf.get("attention_bias")), "attention_bias=true (q/k/v/o projection biases)")
    refuse(bool(hf.get("mlp_bias")), "mlp_bias=true")
    max_pos = int(hf.get("max_position_embeddings") or DEFAULTS[arch]["max_position_embeddings"])
    window = hf.get("sliding_window") if hf.get("use_sliding_window", arch == "mixtral") else None
    refuse(window is not None and window < max_pos, f"sliding_window={window} (< max_position_embeddings={max_pos})")
    theta, scaling = _rope_from_hf(hf, arch, max_pos)
    D, H, L = get("hidden_size"), get("num_attention_heads"), get("num_hidden_layers")
    kw = dict(
        vocab_size=get("vocab_size"), d_model=D, n_layers=L, n_heads=H, n_kv_heads=hf.get("num_key_value_heads") or H,
        head_dim=hf.get("head_dim") or D // H, d_ff=get("intermediate_size"), max_seq_len=max_pos, rope_theta=theta,
        rope_scaling=scaling, norm_eps=float(hf.get("rms_norm_eps", DEFAULTS[arch]["rms_norm_eps"])),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=float(hf.get("initializer_range", 0.02)),
    )
    if arch != "llama":
        kw.update(top_k=get("num_experts_per_tok"), aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)), z_loss_coef=0.0)
    if arch == "mixtral":
        kw.update(n_experts=get("num_local_experts"), d_ff_expert=kw["d_ff"], norm_topk=True)
    elif arch == "qwen3_moe":
        E = hf.get("num_experts", hf.get("num_local_experts"))
        if E is None:
            raise ValueError("config.json: missing 'num_experts' (needed for Qwen3MoeForCausalLM)")
        step, only = hf.get("decoder_sparse_step") or 1, set(hf.get("mlp_only_layers") or ())
        dense = tuple(i for i in range(L) if i in only or (i + 1) % step) if E else ()
        kw.update(n_experts=E, d_ff_expert=get("moe_intermediate_size"), dense_layers=dense, qk_norm=True,
                  norm_topk=bool(hf.get("norm_topk_prob", False)))
    return arch, ModelConfig(**kw)


def choose_arch(cfg: ModelConfig, arch: str | None = None) -> str:
    """The HF architecture an omnigpt config exports as (default: llama if dense, else mixtral or qwen3_moe)."""
    if arch is None:
        arch = "llama" if not cfg.n_experts else "qwen3_moe" if cfg.qk_norm or cfg.dense_layers or not cfg.norm_topk else "mixtral"
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    c = cfg
    problems = {
        "llama": [(c.n_experts > 0, f"n_experts={c.n_experts} (Llama is dense)"),
                  (c.qk_norm, "qk_norm=True (Llama has no q/k norm)")],
        "mixtral": [(c.n_experts == 0, "n_experts=0 (Mixtral is MoE)"),
                    (bool(c.dense_layers), f"dense_layers={c.dense_layers} (every Mixtral layer is MoE)"),
                    (c.qk_norm, "qk_norm=True (Mixtral has no q/k norm)"),
                    (not c.norm_topk, "norm_topk=False (Mixtral always renormalises)")],
        "qwen3_moe": [(c.n_experts == 0, "n_experts=0 (export dense models as llama)"),
                      (not c.qk_norm, "qk_norm=False (Qwen3 always has q/k norm)")],
    }[arch]
    bad = [why for is_bad, why in problems if is_bad]
    if bad:
        raise ValueError(f"cannot export as {ARCHS[arch]}: {'; '.join(bad)}")
    return arch


def config_to_hf(cfg: ModelConfig, arch: str, dtype: torch.dtype = torch.float32) -> dict:
    hf = dict(
        architectures=[ARCHS[arch]], model_type=arch, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff_expert if arch == "mixtral" else cfg.d_ff, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_parameters=_rope_to_hf(cfg),
        tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std, dtype=str(dtype).removeprefix("torch."),
        use_cache=True,
    )
    if arch != "mixtral":
        hf.update(attention_bias=False)
    if arch != "llama":
        hf.update(num_experts_per_tok=cfg.top_k, router_aux_loss_coef=cfg.aux_loss_coef)
    if arch == "mixtral":
        hf.update(num_local_experts=cfg.n_experts, sliding_window=None)
    elif arch == "qwen3_moe":
        hf.update(num_experts=cfg.n_experts, moe_intermediate_size=cfg.d_ff_expert, norm_topk_prob=cfg.norm_topk,
                  decoder_sparse_step=1, mlp_only_layers=list(cfg.dense_layers), use_sliding_window=False, sliding_window=None)
    return hf


# ---- reading safetensors -------------------------------------------------------------------------------------
class _Checkpoint:
    """Lazy view of a (possibly sharded) safetensors checkpoint; `take` checks names and shapes."""

    def __init__(self, path: Path):
        self.path = path
        if (path / INDEX_NAME).is_file():
            weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
            self.where = {name: path / f for name, f in weight_map.items()}
        elif (path / WEIGHTS_NAME).is_file():
            with safe_open(path / WEIGHTS_NAME, "pt") as f:
                self.where = dict.fromkeys(f.keys(), path / WEIGHTS_NAME)
        else:
            raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME} (only safetensors checkpoints are read, never pickles)")
        self.files, self.used = {}, set()

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def take(self, names: str | list[str], shape: tuple[int, ...]) -> torch.Tensor:
        """The first of `names` present (alternative spellings of one tensor), checked against `shape`."""
        names = [names] if isinstance(names, str) else names
        for name in names:
            if name in self.where:
                file = self.where[name]
                if file not in self.files:
                    if not file.is_file():
                        raise FileNotFoundError(f"{self.path}: shard {file.name} (holding {name!r}) is missing")
                    self.files[file] = safe_open(file, "pt")
                t = self.files[file].get_tensor(name)
                if tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{self.path}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)} for this config")
                self.used.add(name)
                return t
        raise ValueError(f"{self.path}: missing tensor {names[0]!r} (expected shape {tuple(shape)})")


def _read_state(ck: _Checkpoint, cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    D, H, G, h, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size
    sd = {"embed.weight": ck.take("model.embed_tokens.weight", (V, D))}
    for i in range(cfg.n_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        sd[o + "attn.wqkv.weight"] = torch.cat([ck.take(p + f"self_attn.{n}_proj.weight", (rows, D))
                                                for n, rows in (("q", H * h), ("k", G * h), ("v", G * h))])
        sd[o + "attn.wo.weight"] = ck.take(p + "self_attn.o_proj.weight", (D, H * h))
        if cfg.qk_norm:
            for n in ("q", "k"):
                sd[o + f"attn.{n}_norm.weight"] = ck.take(p + f"self_attn.{n}_norm.weight", (h,))
        sd[o + "attn_norm.weight"] = ck.take(p + "input_layernorm.weight", (D,))
        sd[o + "mlp_norm.weight"] = ck.take(p + "post_attention_layernorm.weight", (D,))
        if not cfg.is_moe_layer(i):
            Fd = cfg.d_ff
            sd[o + "mlp.w_gate_up.weight"] = torch.cat([ck.take(p + f"mlp.{n}_proj.weight", (Fd, D)) for n in ("gate", "up")])
            sd[o + "mlp.w_down.weight"] = ck.take(p + "mlp.down_proj.weight", (D, Fd))
            continue
        E, Fe, prefixes = cfg.n_experts, cfg.d_ff_expert, MOE_PREFIXES[arch]
        sd[o + "mlp.router.gate.weight"] = ck.take([p + f"{m}.gate.weight" for m in prefixes], (E, D))
        fused = [p + f"{m}.experts.gate_up_proj" for m in prefixes]
        if any(n in ck for n in fused):
            sd[o + "mlp.w_gate_up"] = ck.take(fused, (E, 2 * Fe, D))
            sd[o + "mlp.w_down"] = ck.take([p + f"{m}.experts.down_proj" for m in prefixes], (E, D, Fe))
            continue
        gate, up, down = EXPERT_NAMES[arch]

        def expert(e, n, shape):
            return ck.take([p + f"{m}.experts.{e}.{n}.weight" for m in prefixes], shape)

        sd[o + "mlp.w_gate_up"] = torch.stack([torch.cat([expert(e, gate, (Fe, D)), expert(e, up, (Fe, D))]) for e in range(E)])
        sd[o + "mlp.w_down"] = torch.stack([expert(e, down, (D, Fe)) for e in range(E)])
    sd["norm.weight"] = ck.take("model.norm.weight", (D,))
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = ck.take("lm_head.weight", (V, D))
    elif "lm_head.weight" in ck:
        ck.used.add("lm_head.weight")  # some tied checkpoints store a copy; the embedding wins
    left = sorted(n for n in set(ck.where) - ck.used if not n.endswith("rotary_emb.inv_freq"))
    if left:
        raise ValueError(f"{ck.path}: unexpected tensor {left[0]!r} for {ARCHS[arch]} with this config; {len(left)} unexpected in all")
    return sd


def import_hf(path: str | os.PathLike, dtype: torch.dtype | None = None) -> Transformer:
    """Load a HF Llama / Mixtral / Qwen3-MoE checkpoint folder as an omnigpt Transformer (on the CPU).

    dtype: None keeps the checkpoint's dtype (that of its token embedding)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face checkpoint folder)")
    arch, cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    sd = _read_state(_Checkpoint(path), cfg, arch)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype or sd["embed.weight"].dtype).to_empty(device="cpu")
    load_state_dict_checked(model, sd, source=str(path))
    return model


# ---- writing -------------------------------------------------------------------------------------------------
def parse_size(size: int | str) -> int:
    """'2GB' -> 2e9 bytes, '500MiB' -> 500 * 2**20, an int is bytes (HF's max_shard_size spelling)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected a size like 2GB, 500MB or 1GiB")
    unit = (1024 if m[3] else 1000) ** "_KMGT".index(m[2] or "_")
    return int(float(m[1]) * unit)


def _hf_state(model: Transformer, arch: str) -> dict[str, torch.Tensor]:
    cfg, sd = model.cfg, {k: v.detach().cpu() for k, v in model.state_dict().items()}
    H, G, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    out = {"model.embed_tokens.weight": sd["embed.weight"]}
    for i in range(cfg.n_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        q, k, v = sd[o + "attn.wqkv.weight"].split([H * h, G * h, G * h])
        out.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                    p + "self_attn.o_proj.weight": sd[o + "attn.wo.weight"],
                    p + "input_layernorm.weight": sd[o + "attn_norm.weight"],
                    p + "post_attention_layernorm.weight": sd[o + "mlp_norm.weight"]})
        if cfg.qk_norm:
            out.update({p + f"self_attn.{n}_norm.weight": sd[o + f"attn.{n}_norm.weight"] for n in ("q", "k")})
        if not cfg.is_moe_layer(i):
            gate, up = sd[o + "mlp.w_gate_up.weight"].chunk(2)
            out.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": sd[o + "mlp.w_down.weight"]})
            continue
        m = MOE_PREFIXES[arch][0]
        out[p + f"{m}.gate.weight"] = sd[o + "mlp.router.gate.weight"]
        gate, up, down = EXPERT_NAMES[arch]
        for e in range(cfg.n_experts):
            g, u = sd[o + "mlp.w_gate_up"][e].chunk(2)
            out.update({p + f"{m}.experts.{e}.{gate}.weight": g, p + f"{m}.experts.{e}.{up}.weight": u,
                        p + f"{m}.experts.{e}.{down}.weight": sd[o + "mlp.w_down"][e]})
    out["model.norm.weight"] = sd["norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.clone().contiguous() for k, v in out.items()}  # own storage each: safetensors refuses shared views


def _write_shards(tensors: dict[str, torch.Tensor], out: Path, max_shard_size: int | str | None) -> list[str]:
    for old in [*out.glob("model-*-of-*.safetensors"), out / WEIGHTS_NAME, out / INDEX_NAME]:
        old.unlink(missing_ok=True)  # a stale file of an earlier export would shadow or contradict this one
    limit = parse_size(max_shard_size) if max_shard_size else None
    shards, size = [[]], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if limit and shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    if len(shards) == 1:
        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        return [WEIGHTS_NAME]
    files, weight_map = [], {}
    for j, names in enumerate(shards, 1):
        files.append(f"model-{j:05d}-of-{len(shards):05d}.safetensors")
        save_file({n: tensors[n] for n in names}, str(out / files[-1]), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, files[-1]))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return files


def export_hf(model: Transformer, out_dir: str | os.PathLike, arch: str | None = None,
              max_shard_size: int | str | None = None, extra_config: dict | None = None) -> dict:
    """Write `model` as a HF checkpoint that `AutoModelForCausalLM.from_pretrained(out_dir)` loads.

    arch: 'llama', 'mixtral' or 'qwen3_moe' (default: chosen from the config). max_shard_size ('2GB', bytes)
    splits the weights into shards with an index. extra_config (e.g. bos/eos token ids) joins config.json.
    Returns the config.json written."""
    arch = choose_arch(model.cfg, arch)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _hf_state(model, arch)
    _write_shards(tensors, out, max_shard_size)
    hf = {**config_to_hf(model.cfg, arch, model.head_weight().dtype), **(extra_config or {})}
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    return hf
