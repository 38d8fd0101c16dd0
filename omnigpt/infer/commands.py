"""`omnigpt generate`: sample continuations from a checkpoint (or a randomly initialised preset)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from omnigpt.infer.generate import generate
from omnigpt.infer.sampling import SamplingParams


def load_model_and_tokenizer(args):
    """A checkpoint folder (weights + config.json + tokenizer/), or --preset with random weights (smoke tests)."""
    from omnigpt.config import preset
    from omnigpt.model.transformer import Transformer
    from omnigpt.model.weights import load_model
    from omnigpt.tokenizer.text import Tokenizer, load_tokenizer

    if args.checkpoint:
        model = load_model(args.checkpoint, device=args.device)
        tok_dir = Path(args.checkpoint) / "tokenizer"
        tok = Tokenizer.load(str(tok_dir)) if tok_dir.is_dir() else load_tokenizer(args.tokenizer)
    else:
        tok = load_tokenizer(args.tokenizer)
        torch.manual_seed(args.seed or 0)
        model = Transformer(preset(args.preset, vocab_size=tok.padded_vocab_size())).to(args.device)
    if model.cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids but the model's vocab_size is {model.cfg.vocab_size}")
    return model.eval(), tok


def cmd_generate(args) -> None:
    model, tok = load_model_and_tokenizer(args)
    params = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
        stop=tuple(args.stop or ()), seed=args.seed,
    )
    prompts = [tok.encode(p) for p in args.prompt]
    t0 = time.perf_counter()
    results = generate(model, prompts, params, eos_ids=(tok.eot_id, tok.im_end_id), decode=tok.decode,
                       vocab_size=tok.vocab_size)
    dt = time.perf_counter() - t0
    for prompt, r in zip(args.prompt, results):
        print(f"{prompt}\033[1m{r.text}\033[0m  [{len(r.tokens)} tokens, {r.finish_reason}]")
    n = sum(len(r.tokens) for r in results)
    print(f"# {n} tokens in {dt:.2f} s ({n / dt:.1f} tokens/s) on {args.device}")


def add_commands(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a checkpoint (or a random preset)")
    p.add_argument("checkpoint", nargs="?", help="checkpoint folder (omit with --preset for random weights)")
    p.add_argument("--preset", default="tiny", help="model preset when no checkpoint is given")
    p.add_argument("--tokenizer", default="cl100k_base", help="tokenizer when the checkpoint has none")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=cmd_generate)
