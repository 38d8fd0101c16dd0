"""Training-step throughput of omnigpt next to Hugging Face transformers, same shapes, same run.

    python benchmarks/train_step.py                      # all variants, B=16, T=2048 (GPU)
    python benchmarks/train_step.py --variants omni-dense-compile,hf-llama --steps 5

A step is forward + backward + fused AdamW. Tokens/s counts B*T per step; MFU uses omnigpt's FLOPs per token
(6*N_active + 12*L*H*hd*T, see omnigpt/config.py) for every variant, since the shapes are identical, against
the GPU's dense bf16 peak (989 TFLOP/s for H100/H200 SXM). Ratios are against the HF variant of the same family.
Before timing, the grouped-GEMM expert path is checked against the per-expert loop on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import math
import time

# Each variant compiles afresh: a cached graph keeps the attention kernel chosen when it was traced.
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")

import torch  # noqa: E402

from omnigpt.config import small, small_moe  # noqa: E402
from omnigpt.model.moe import expert_mlp_grouped, expert_mlp_loop  # noqa: E402
from omnigpt.model.transformer import Transformer  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops() -> float:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))


def check_grouped_mm() -> float:
    torch.manual_seed(0)
    E, D, F = 8, 768, 2048
    counts = torch.tensor([900, 0, 1500, 333, 2000, 17, 1200, 2242], device="cuda")
    x = torch.randn(int(counts.sum()), D, device="cuda", dtype=torch.bfloat16)
    wgu = torch.randn(E, 2 * F, D, device="cuda", dtype=torch.bfloat16) / math.sqrt(D)
    wd = torch.randn(E, D, F, device="cuda", dtype=torch.bfloat16) / math.sqrt(F)
    ref = expert_mlp_loop(x.double(), counts, wgu.double(), wd.double())
    got = expert_mlp_grouped(x, counts, wgu, wd)
    return float((got.double() - ref).abs().max() / ref.abs().max())


def hf_model(kind: str, cfg):
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                  max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=False, attn_implementation="sdpa")
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(intermediate_size=cfg.d_ff, **common))
    return MixtralForCausalLM(MixtralConfig(intermediate_size=cfg.d_ff_expert, num_local_experts=cfg.n_experts,
                                            num_experts_per_tok=cfg.top_k, output_router_logits=True,
                                            router_aux_loss_coef=cfg.aux_loss_coef, **common))


def build(variant: str):
    moe = "moe" in variant or "mixtral" in variant
    cfg = small_moe() if moe else small()
    if variant.startswith("hf"):
        model = hf_model("mixtral" if moe else "llama", cfg).cuda().to(torch.bfloat16)
        step_loss = lambda ids: model(input_ids=ids, labels=ids).loss  # noqa: E731 (HF shifts labels inside)
        return cfg, model, step_loss
    model = Transformer(cfg).cuda()
    bf16_weights = "bf16w" in variant
    if bf16_weights:
        model = model.to(torch.bfloat16)
    # "-mat": Inductor autotunes its GEMMs (Triton templates vs cuBLAS) and kernel configs; minutes of compiling.
    mode = "max-autotune-no-cudagraphs" if "-mat" in variant else None
    fwd = torch.compile(model, mode=mode) if "compile" in variant else model

    def step_loss(ids):
        targets = ids.roll(-1, 1)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not bf16_weights):
            return fwd(ids, targets).loss

    return cfg, model, step_loss


def sdpa_backends(variant: str):
    """`-cudnn` / `-flash` suffixes pin the attention kernel; otherwise PyTorch's own choice."""
    from torch.nn.attention import SDPBackend
    if variant.endswith("-cudnn"):
        return [SDPBackend.CUDNN_ATTENTION]
    if variant.endswith("-flash"):
        return [SDPBackend.FLASH_ATTENTION]
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def time_attention(batch: int, seq: int, heads: int = 12, head_dim: int = 64) -> dict[str, float]:
    """Causal SDPA forward+backward alone, per kernel: TFLOP/s counting the full T x T square (as MFU does)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    flops = 3 * 4 * batch * heads * seq * seq * head_dim  # fwd (2 matmuls) + bwd (2x)
    out = {}
    for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        try:
            with sdpa_kernel([backend]):
                for i in range(13):
                    if i == 3:
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
                torch.cuda.synchronize()
            out[name] = round(flops * 10 / (time.perf_counter() - t0) / 1e12, 1)
        except RuntimeError as e:
            out[name] = f"unavailable: {str(e)[:80]}"
    return out


def run(variant: str, batch: int, seq: int, steps: int, warmup: int, profile: bool = False) -> dict:
    from torch.nn.attention import sdpa_kernel
    torch._dynamo.reset()  # else a compiled graph from the previous variant (other kernel choice) is reused
    with sdpa_kernel(sdpa_backends(variant)):
        return run_variant(variant, batch, seq, steps, warmup, profile)


def print_profile(step, n: int = 2, top: int = 18) -> None:
    """The step's GPU time by kernel (after timing): where the rest of the way to the peak goes."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events)
    print(f"  profile: {total / n / 1e3:.1f} ms of kernels per step")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"  {e.self_device_time_total / total:6.1%} {e.self_device_time_total / n / 1e3:7.2f} ms  x{e.count // n:<4d} {e.key[:110]}")


def run_variant(variant: str, batch: int, seq: int, steps: int, warmup: int, profile: bool = False) -> dict:
    torch.manual_seed(0)
    cfg, model, step_loss = build(variant)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
    losses = []

    def step():
        loss = step_loss(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(warmup):
        losses.append(float(step()))
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        loss = step()
    end.record()
    torch.cuda.synchronize()
    sec = start.elapsed_time(end) / 1e3 / steps
    tok_s = batch * seq / sec
    mfu = tok_s * cfg.flops_per_token(seq) / peak_flops()
    out = dict(variant=variant, tokens_per_s=round(tok_s), mfu=round(mfu, 4), step_ms=round(sec * 1e3, 1),
               first_loss=round(losses[0], 3), last_loss=round(float(loss), 3), warmup_s=round(warm_s, 1),
               peak_mem_gb=round(torch.cuda.max_memory_allocated() / 1e9, 1))
    if profile:
        print_profile(step)
    model = opt = None  # free the memory before the next variant
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="hf-llama,omni-dense-eager,omni-dense-compile,omni-dense-compile-bf16w,"
                                          "hf-mixtral,omni-moe-eager,omni-moe-compile,omni-moe-compile-bf16w")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--profile", default="", help="comma-separated variants whose kernels to list after timing")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    import transformers
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} transformers {transformers.__version__} "
          f"B={args.batch} T={args.seq}")
    print(f"grouped_mm vs float64 per-expert loop: max rel err {check_grouped_mm():.2e}")
    print(f"causal attention fwd+bwd TFLOP/s (B={args.batch}, H=12, T={args.seq}, hd=64): {time_attention(args.batch, args.seq)}")
    rows, base = [], {}
    for v in args.variants.split(","):
        try:
            r = run(v, args.batch, args.seq, args.steps, args.warmup, v in args.profile.split(","))
        except Exception as e:  # report and go on: one failing variant must not lose the others' figures
            print(f"{v:28s} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        family = "moe" if ("moe" in v or "mixtral" in v) else "dense"
        if v.startswith("hf"):
            base[family] = r["tokens_per_s"]
        r["vs_hf"] = round(r["tokens_per_s"] / base[family], 2) if family in base else None
        rows.append(r)
        print(f"{v:28s} {r['tokens_per_s']:>9,} tok/s  MFU {r['mfu']:.1%}  {r['step_ms']:7.1f} ms/step  "
              f"x{r['vs_hf']} vs HF  loss {r['first_loss']}->{r['last_loss']}  mem {r['peak_mem_gb']} GB  "
              f"(warmup {r['warmup_s']} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
