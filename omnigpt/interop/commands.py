"""`omnigpt convert import|export`: Hugging Face Llama / Mixtral / Qwen3-MoE checkpoints in and out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from omnigpt.cli import CommandError

HF_KEEP = ("bos_token_id", "eos_token_id", "pad_token_id")  # token ids our config has no field for; kept for the round trip


def _describe(model, arch: str) -> str:
    from omnigpt.interop.hf import ARCHS

    cfg, counts = model.cfg, model.cfg.param_counts()
    kind = "dense"
    if cfg.n_experts:
        kind = f"MoE {cfg.n_experts} experts top-{cfg.top_k}" + (f", dense layers {list(cfg.dense_layers)}" if cfg.dense_layers else "")
    dtype = str(model.head_weight().dtype).removeprefix("torch.")
    return (f"{ARCHS[arch]}: {kind}; {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads ({cfg.n_kv_heads} kv) x {cfg.head_dim}, "
            f"vocab {cfg.vocab_size}; {counts['total']:,} parameters ({counts['active']:,} active), {dtype}")


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    from omnigpt.interop.hf import SIDE_FILES

    copied = [n for n in SIDE_FILES if (src / n).is_file()]
    for n in copied:
        shutil.copyfile(src / n, dst / n)
    return copied


def cmd_import(args) -> None:
    from omnigpt.interop.hf import hf_arch, import_hf
    from omnigpt.model.weights import save_model

    src, out = Path(args.hf_dir), Path(args.out_dir)
    if not (src / "config.json").is_file():
        raise CommandError(f"{src}: no config.json (expected a Hugging Face checkpoint folder)")
    hf = json.loads((src / "config.json").read_text())
    arch = hf_arch(hf)
    model = import_hf(src)
    save_model(model, out, extra_config={"hf": {"architecture": arch, **{k: hf[k] for k in HF_KEEP if k in hf}}})
    side = _copy_side_files(src, out)
    print(f"imported {src} -> {out}")
    print(f"  {_describe(model, arch)}")
    if side:
        print(f"  copied {', '.join(side)}")


def cmd_export(args) -> None:
    from omnigpt.interop.hf import export_hf
    from omnigpt.model.weights import load_model, read_config

    src, out = Path(args.ckpt_dir), Path(args.out_dir)
    if src.resolve() == out.resolve():
        raise CommandError("OUT_DIR must differ from CKPT_DIR (both would have a config.json)")
    raw = read_config(src)
    model = load_model(src)
    extra = {k: v for k, v in raw.get("hf", {}).items() if k in HF_KEEP}
    hf = export_hf(model, out, arch=args.arch, max_shard_size=args.max_shard_size, extra_config=extra)
    side = _copy_side_files(src, out)
    shards = sorted(p.name for p in out.glob("model*.safetensors"))
    print(f"exported {src} -> {out} ({len(shards)} safetensors file{'s' if len(shards) > 1 else ''})")
    print(f"  {_describe(model, hf['model_type'])}")
    if side:
        print(f"  copied {', '.join(side)}")


def add_commands(sub) -> None:
    p = sub.add_parser("convert", help="import / export Hugging Face Llama, Mixtral and Qwen3-MoE checkpoints")
    conv = p.add_subparsers(dest="convert_command", metavar="ACTION")
    conv.required = True
    imp = conv.add_parser("import", help="HF checkpoint folder (config.json + safetensors) -> omnigpt checkpoint")
    imp.add_argument("hf_dir", metavar="HF_DIR")
    imp.add_argument("out_dir", metavar="OUT_DIR")
    imp.set_defaults(func=cmd_import)
    exp = conv.add_parser("export", help="omnigpt checkpoint -> HF checkpoint that transformers from_pretrained loads")
    exp.add_argument("ckpt_dir", metavar="CKPT_DIR")
    exp.add_argument("out_dir", metavar="OUT_DIR")
    exp.add_argument("--arch", choices=["llama", "mixtral", "qwen3_moe"], default=None,
                     help="HF architecture (default: llama if dense, qwen3_moe if MoE with q/k norm, dense layers or unnormalised top-k, else mixtral)")
    exp.add_argument("--max-shard-size", default=None, metavar="SIZE", help="split weights into shards of at most SIZE (e.g. 2GB) with an index")
    exp.set_defaults(func=cmd_export)
