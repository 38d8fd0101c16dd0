"""The serving engine's decode on a GPU: plain steps vs static steps replayed as CUDA graphs (eager kernels, and
torch.compile'd kernels for row buckets up to 32), on the 1.1B Llama shape of benchmarks/decode.py.

    PYTHONPATH=. python3 benchmarks/engine_decode.py [--json out.json]

For each engine setting: warm-up (captures and compiles happen there), then 1 request and 32 concurrent requests
of 64 greedy tokens after a 24-token prompt, timed end to end through Engine.submit (prefill included). Checks that
the graph engines' tokens agree with the plain engine's (random weights have near-tied logits, so bf16 rounding
in other kernels may flip a token and the rest of that sequence: agreement is reported, not asserted).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.decode import SHAPE
from omnigpt.config import ModelConfig
from omnigpt.infer.engine import Engine, EngineConfig, GenerationRequest
from omnigpt.infer.sampling import SamplingParams
from omnigpt.model.transformer import Transformer
from omnigpt.serve.testing import tiny_tokenizer

SETTINGS = {"plain": dict(decode_graphs=False), "graphs": dict(decode_graphs=True),
            "graphs+compile": dict(decode_graphs=True, compile_decode=True)}


def run(engine: Engine, prompts: list[list[int]], new: int) -> tuple[list[list[int]], float]:
    params = SamplingParams(temperature=0, max_new_tokens=new)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    handles = [engine.submit(GenerationRequest(p, params)) for p in prompts]
    out = [h.result(timeout=600).choices[0].token_ids for h in handles]
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU: checks the script, times nothing")
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    torch.manual_seed(0)
    shape = dict(SHAPE, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128) if args.smoke else SHAPE
    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    model = Transformer(ModelConfig(**shape)).to(device, dtype).eval()
    tok = tiny_tokenizer(Path(tempfile.mkdtemp()), vocab_size=512)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, tok.n_text, (24,), generator=g).tolist() for _ in range(args.streams)]
    rows = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    reference = None
    print(f"# {rows['device']} torch {rows['torch']}; {model.num_params() / 1e9:.2f}B {dtype}; {args.new_tokens} new tokens, 24-token prompts")
    for name in args.settings.split(","):
        cfg = EngineConfig(max_batch_size=args.streams, max_seq_len=256, prefix_cache_rows=0, **SETTINGS[name])
        with Engine(model, tok, cfg) as engine:
            t0 = time.perf_counter()
            run(engine, prompts[:1], 8)
            run(engine, prompts, 8)
            warm = time.perf_counter() - t0
            _, sec1 = run(engine, prompts[:1], args.new_tokens)
            outs, secN = run(engine, prompts, args.new_tokens)
        one, many = args.new_tokens / sec1, args.streams * args.new_tokens / secN
        reference = reference or outs
        agree = sum(a == b for o, r in zip(outs, reference) for a, b in zip(o, r)) / sum(len(r) for r in reference)
        print(f"{name:15s} 1 stream {one:7.1f} tok/s   {args.streams} streams {many:8.1f} tok/s aggregate "
              f"(x{many / one:.1f})   tokens agree with plain {agree:.0%}   warm-up {warm:.0f}s", flush=True)
        rows[name] = dict(one_stream_tok_s=one, many_streams_tok_s=many, agreement_with_plain=agree, warmup_s=warm)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
