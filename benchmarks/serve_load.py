"""CPU load test of `omnigpt serve`: many concurrent clients against a tiny model, every answer checked.

    python benchmarks/serve_load.py                      # 200 requests, 32 concurrent clients
    python benchmarks/serve_load.py --requests 500 --concurrency 64 --checkpoint runs/speedrun/latest

The server runs as its own process (`omnigpt serve`), as users run it. Each request is a greedy chat
completion (half of them streamed) of one of a few dozen prompts, so the right answer is known: it is the
answer the server gives to that prompt when it is alone. Under load every answer must be exactly that
(continuous batching, prefix caching and concurrency must not change a single token) and must have used
exactly --max-tokens tokens (end-of-text is biased away so that lengths are fixed).

Printed: end-to-end latency and time to first token (p50 / p99), requests/s and generated tokens/s, next to
a baseline measured in the same run: the same requests sent one at a time by a single client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

MODEL = "omnigpt-load"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompts", type=int, default=40, help="distinct prompts (shared system prompt, different questions)")
    p.add_argument("--baseline-requests", type=int, default=40, help="requests sent one at a time for the baseline")
    p.add_argument("--checkpoint", default=None, help="default: a tiny random model made for the test")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="the server's CPU threads for the model (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, port: int, rows: int, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "import sys; from omnigpt.cli import main; sys.exit(main())", "serve", str(checkpoint),
           "--port", str(port), "--max-batch-size", str(rows), "--max-queue", "1024", "--model-name", MODEL]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited:\n" + proc.stdout.read())
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.25)
    proc.kill()
    raise SystemExit("the server did not come up in 180 s")


def make_prompts(n: int, rng: random.Random) -> list[list[dict]]:
    words = "fox dog json list hello world quick lazy brown jumps over the a and me you".split()
    system = {"role": "system", "content": "You are a careful assistant. Answer in one short sentence. " * 3}
    return [[system, {"role": "user", "content": " ".join(rng.choice(words) for _ in range(rng.randint(2, 40)))}]
            for _ in range(n)]


async def one_request(client: httpx.AsyncClient, body: dict, stream: bool) -> dict:
    """Send one chat completion; return its text, usage, latency and time to first token."""
    t0 = time.perf_counter()
    if not stream:
        r = await client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        data = r.json()
        t = time.perf_counter() - t0
        return {"text": data["choices"][0]["message"]["content"], "tokens": data["usage"]["completion_tokens"],
                "latency": t, "ttft": None}
    text, ttft, usage = [], None, None
    async with client.stream("POST", "/v1/chat/completions",
                             json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            for c in event["choices"]:
                if c["delta"].get("content"):
                    ttft = ttft or time.perf_counter() - t0
                    text.append(c["delta"]["content"])
            usage = event.get("usage") or usage
    return {"text": "".join(text), "tokens": usage["completion_tokens"], "latency": time.perf_counter() - t0, "ttft": ttft}


async def run_load(url: str, bodies: list[tuple[int, dict, bool]], concurrency: int) -> tuple[list[dict], float]:
    """bodies: (prompt index, body, stream). `concurrency` clients take requests from a shared queue."""
    queue: asyncio.Queue = asyncio.Queue()
    for item in bodies:
        queue.put_nowait(item)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client_loop(client):
        while not queue.empty():
            i, body, stream = queue.get_nowait()
            try:
                out = await one_request(client, body, stream)
            except Exception as e:  # an error is a wrong answer, not a crash of the benchmark
                out = {"text": None, "tokens": 0, "latency": float("nan"), "ttft": None, "error": repr(e)}
            results.append({"prompt": i, "stream": stream, **out})

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        return results, time.perf_counter() - t0


def engine_busy(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("omnigpt_engine_busy_seconds_total "):
            return float(line.split()[1])
    return float("nan")


def pct(values: list[float], q: float) -> float:
    values = sorted(v for v in values if v is not None)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values)) - 1))]


def summary(name: str, results: list[dict], wall: float) -> dict:
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in results)
    row = {"name": name, "requests": len(results), "wall_s": wall, "req_per_s": len(results) / wall,
           "tokens_per_s": tokens / wall, "p50_ms": 1000 * pct(lat, 50), "p99_ms": 1000 * pct(lat, 99),
           "ttft_p50_ms": 1000 * pct(ttft, 50), "ttft_p99_ms": 1000 * pct(ttft, 99)}
    print(f"{name:<22} {row['requests']:>5} req  {wall:7.2f} s  {row['req_per_s']:7.1f} req/s  "
          f"{row['tokens_per_s']:8.1f} tok/s  latency p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
          f"TTFT p50 {row['ttft_p50_ms']:6.1f} ms  p99 {row['ttft_p99_ms']:6.1f} ms")
    return row


def main() -> int:
    args = parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            checkpoint = Path(args.checkpoint)
        else:
            from omnigpt.serve.testing import make_tiny_checkpoint

            checkpoint = make_tiny_checkpoint(Path(tmp) / "tiny", max_seq_len=512)
        from omnigpt.serve.checkpoint import load_for_serving

        tok = load_for_serving(checkpoint).tokenizer
        no_eos = {str(tok.im_end_id): -100, str(tok.eot_id): -100}
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(checkpoint, port, args.max_batch_size, args.threads)
        try:
            prompts = make_prompts(args.prompts, rng)

            def body(i: int) -> dict:
                return {"model": MODEL, "messages": prompts[i], "temperature": 0, "max_tokens": args.max_tokens,
                        "logit_bias": no_eos}

            # The right answers: each prompt alone on the idle server.
            expected, _ = asyncio.run(run_load(url, [(i, body(i), False) for i in range(args.prompts)], 1))
            expected_text = {r["prompt"]: r["text"] for r in expected}

            load = [(i, body(i), k % 2 == 1) for k, i in enumerate(rng.choices(range(args.prompts), k=args.requests))]
            baseline, base_wall = asyncio.run(run_load(url, load[: args.baseline_requests], 1))
            busy_before = engine_busy(url)
            results, wall = asyncio.run(run_load(url, load, args.concurrency))
            busy = engine_busy(url) - busy_before
            metrics = httpx.get(url + "/metrics").text
        finally:
            server.terminate()
            server.wait(30)

    wrong = [r for r in results + baseline
             if r["text"] != expected_text[r["prompt"]] or r["tokens"] != args.max_tokens]
    print(f"\nomnigpt serve load test: {checkpoint if args.checkpoint else 'tiny random model'}, "
          f"{args.max_tokens} tokens per answer, {args.max_batch_size} KV rows, {os.cpu_count()} CPU cores, "
          f"model threads {args.threads or 'default'}, load average {os.getloadavg()[0]:.1f}")
    base = summary("1 client (baseline)", baseline, base_wall)
    load_row = summary(f"{args.concurrency} clients", results, wall)
    print(f"throughput ratio vs baseline: {load_row['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s; "
          f"p50 latency ratio {load_row['p50_ms'] / base['p50_ms']:.2f}x")
    counters = ("omnigpt_prefix_cache_hit_tokens_total", "omnigpt_prompt_tokens_total")
    hits = [line for line in metrics.splitlines() if line.startswith(counters)]
    print("server counters: " + "; ".join(hits))
    print(f"engine busy {busy:.2f} s of {wall:.2f} s under load ({100 * busy / wall:.0f}%): the rest is HTTP, "
          "JSON and the clients themselves, on the same cores")
    print(f"answers correct: {len(results) + len(baseline) - len(wrong)}/{len(results) + len(baseline)}")
    for r in wrong[:5]:
        print("  wrong:", {k: r.get(k) for k in ("prompt", "stream", "tokens", "error")}, repr(r["text"])[:80])
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
