"""Decode speed of a ~1.1B Llama-shape model (d=2048, 22 layers, GQA 32/4): omnigpt next to HF `generate`.

    PYTHONPATH=. python3 benchmarks/decode.py [--new-tokens 96] [--json out.json]

Reports, in one run on one GPU, bf16, greedy, 32-token prompts:
  - HF `generate` at batch 1 (the baseline) and omnigpt's eager `generate`;
  - omnigpt's CUDA-graph decode step (omnigpt/infer/cuda_graphs.py) at 1, 8, 32 and 128 concurrent streams, eager
    kernels in the graph and torch.compile'd kernels in the graph;
  - the weight-bandwidth roofline: measured copy bandwidth / bytes of weights (every weight read once per step),
    and a stricter one leaving out the input embedding table (a step reads one row of it), printed beside.
Checks first each graph variant's logits against the eager forward (a random model's logits are nearly tied, so
bf16 rounding may flip some greedy tokens: the logits are the check, the token agreement is printed beside).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from omnigpt.config import ModelConfig
from omnigpt.infer.cuda_graphs import CudaGraphDecoder
from omnigpt.infer.generate import generate
from omnigpt.infer.sampling import SamplingParams
from omnigpt.model.transformer import Transformer

# name -> how to torch.compile the step ("tuned": Inductor's coordinate-descent tuning of its kernels, as gpt-fast
# does; "mat": Inductor's max-autotune, which also tries Triton GEMM templates that take the next op as epilogue)
# "+argmax": the greedy token is taken inside the graph (one kernel less between two replays)
VARIANTS = {"graph": False, "graph+compile": True, "graph+compile+tuned": True,
            "graph+compile+mat": "max-autotune-no-cudagraphs", "graph+compile+tuned+argmax": True}
SHAPE = dict(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632, max_seq_len=2048)


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (time.perf_counter() - t0)  # bytes read + written per second


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def hf_generate_tok_s(cfg: ModelConfig, prompt: torch.Tensor, new: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                                      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                                      num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                                      attn_implementation="sdpa")).cuda().to(torch.bfloat16).eval()
    kw = dict(do_sample=False, min_new_tokens=new, max_new_tokens=new, pad_token_id=0)
    with torch.no_grad():
        hf.generate(prompt, **{**kw, "min_new_tokens": 8, "max_new_tokens": 8})
        _, sec = timed(lambda: hf.generate(prompt, **kw))
    hf = None  # free its weights before ours are timed
    torch.cuda.empty_cache()
    return new / sec


def decoder(model, B: int, max_len: int, variant: str, _made={}) -> CudaGraphDecoder:
    """One decoder (and its captured graphs) per (streams, variant): compiling is paid once."""
    key = (B, max_len, variant)
    if key not in _made:
        torch._inductor.config.coordinate_descent_tuning = "+tuned" in variant or "+mat" in variant
        _made[key] = CudaGraphDecoder(model, B, max_len, compile=VARIANTS[variant], greedy="+argmax" in variant)
        _made[key].warm_up(max_len - 1)  # all captures happen before any timed loop
    return _made[key]


def graph_decode(model, prompts: torch.Tensor, new: int, variant: str):
    """(tokens (B, new), decode-only seconds) with the CUDA-graph step and argmax sampling."""
    B, P = prompts.shape
    dec = decoder(model, B, P + new, variant)
    logits = dec.prefill(prompts, [P] * B)
    positions = torch.arange(P, P + new, device="cuda")
    # the greedy step's output is the graph's static tensor, overwritten by the next replay: keep a copy of it
    pick = (lambda tokens: tokens.clone()) if dec.greedy else (lambda logits: logits.argmax(-1))

    def loop():
        out, tok = [], logits.argmax(-1)
        for i in range(new):
            out.append(tok)
            tok = pick(dec.step(tok, positions[i].expand(B), P + i))
        return torch.stack(out, 1)

    return timed(loop)


def profile_decode(model, prompt, new: int, variant: str, top: int = 14) -> None:
    """GPU time per batch-1 step by kernel, against the step's wall time: kernels or the gaps between them?"""
    from torch.profiler import ProfilerActivity, profile
    graph_decode(model, prompt, new, variant)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _, sec = graph_decode(model, prompt, new, variant)
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events)
    print(f"{variant} profile: {sec / new * 1e6:.0f} us per step wall, {total / new:.0f} us of kernels "
          f"({sum(e.count for e in events) / new:.0f} kernels per step)")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"  {e.self_device_time_total / total:6.1%} {e.self_device_time_total / new:7.1f} us  x{e.count / new:<5.1f} {e.key[:100]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=96)  # 32 + 96 = one 128-slot bucket
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--streams", default="1,8,32,128")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {list(VARIANTS)}")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="after timing, list each variant's kernels at batch 1")
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 64  # one specialisation per (streams, bucket)
    torch.manual_seed(0)
    cfg = ModelConfig(**SHAPE)
    model = Transformer(cfg).cuda().to(torch.bfloat16).eval()
    n_params = model.num_params()
    bw = copy_bandwidth()
    roofline = bw / (2 * n_params)
    strict = bw / (2 * (n_params - model.embed.weight.numel()))
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}; model {n_params / 1e9:.2f}B params bf16; "
          f"copy bandwidth {bw / 1e12:.2f} TB/s -> roofline {roofline:.0f} steps/s at batch 1 "
          f"({strict:.0f} without the embedding table)")
    P, new = args.prompt_len, args.new_tokens
    prompt1 = torch.randint(0, cfg.vocab_size, (1, P), device="cuda")

    rows = {"roofline_steps_s": roofline, "roofline_no_embed_steps_s": strict, "copy_bw": bw, "params": n_params, "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "new_tokens": new, "prompt_len": P}
    eager = generate(model, [prompt1[0].tolist()], SamplingParams(temperature=0, max_new_tokens=new))[0].tokens
    variants = args.variants.split(",")
    for name in variants:
        t0 = time.perf_counter()
        dec = decoder(model, 1, P + new, name)
        first = dec.prefill(prompt1, [P])
        tok = first.argmax(-1)
        got = dec.step(tok, torch.full((1,), P, device="cuda"), P)
        if dec.greedy:  # check the logits of the same step through a plain graph instead, and its argmax
            plain = decoder(model, 1, P + new, name.replace("+argmax", ""))
            plain.prefill(prompt1, [P])
            logits = plain.step(tok, torch.full((1,), P, device="cuda"), P)
            assert torch.equal(got.view(-1), logits.argmax(-1).view(-1)), "the in-graph argmax differs"
            got = logits
        got = got.float()
        with torch.no_grad():
            ref = model(torch.cat([prompt1, tok.view(1, 1)], 1)).logits[:, -1].float()
        err = float((got - ref).abs().max() / ref.abs().max())  # bf16 both: ~1e-2 is rounding
        toks, _ = graph_decode(model, prompt1, new, name)
        agree = sum(a == b for a, b in zip(toks[0].tolist(), eager)) / new
        print(f"{name}: step logits vs eager forward max rel err {err:.2e}; greedy tokens agree with eager generate "
              f"on {agree:.0%} (setup {time.perf_counter() - t0:.0f}s)", flush=True)
        rows[f"{name}_logit_rel_err"], rows[f"{name}_token_agreement"] = err, agree

    hf = hf_generate_tok_s(cfg, prompt1, new)
    _, sec = timed(lambda: generate(model, [prompt1[0].tolist()], SamplingParams(temperature=0, max_new_tokens=new)))
    ours_eager = new / sec
    print(f"HF generate, batch 1:          {hf:8.1f} tok/s  ({hf / roofline:.1%} of roofline)")
    print(f"omnigpt generate (eager), b 1: {ours_eager:8.1f} tok/s  ({ours_eager / roofline:.1%}, x{ours_eager / hf:.1f} HF)")
    rows.update(hf_tok_s=hf, eager_tok_s=ours_eager)
    for name in variants:
        base = None
        for B in [int(s) for s in args.streams.split(",")]:
            prompts = torch.randint(0, cfg.vocab_size, (B, P), device="cuda")
            _, sec = graph_decode(model, prompts, new, name)
            tok_s = B * new / sec
            base = base or tok_s
            extra = (f"  ({new / sec / roofline:.1%} of roofline, {new / sec / strict:.1%} without embedding; "
                     f"x{tok_s / hf:.1f} HF)") if B == 1 else f"  (x{tok_s / base:.1f} vs 1 stream)"
            print(f"{name}, {B:3d} streams: {tok_s:9.1f} tok/s aggregate, {new / sec:7.1f} steps/s{extra}", flush=True)
            rows[f"{name}_{B}_tok_s"] = tok_s
    if args.profile:
        for name in variants:
            profile_decode(model, prompt1, new, name)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
