"""`GET /metrics` in the Prometheus text format (0.0.4), written by hand: a few counters, gauges and one
histogram need no client library."""

from __future__ import annotations

import threading
from collections import Counter

from omnigpt.infer.engine import TTFT_BUCKETS, Engine


class HTTPStats:
    """Responses by route and status code."""

    def __init__(self):
        self.counts: Counter[tuple[str, int]] = Counter()
        self.lock = threading.Lock()

    def add(self, path: str, status: int) -> None:
        route = path if path.startswith("/v1/") or path in ("/", "/health", "/metrics") else "other"
        with self.lock:
            self.counts[(route, status)] += 1


class CountResponses:
    """ASGI middleware feeding HTTPStats."""

    def __init__(self, app, stats: HTTPStats):
        self.app, self.stats = app, stats

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.stats.add(scope.get("path", ""), message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


def _line(name: str, value, labels: dict | None = None) -> str:
    if labels:
        inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
        return f"{name}{{{inner}}} {value}"
    return f"{name} {value}"


def render(engine: Engine, http: HTTPStats | None, model_name: str) -> str:
    s = engine.stats
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict | None, float]]):
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(_line(name, v, labels) for labels, v in samples)

    if http is not None:
        with http.lock:
            items = sorted(http.counts.items())
        metric("omnigpt_http_requests_total", "counter", "HTTP responses by route and status code.",
               [({"route": r, "status": str(c)}, n) for (r, c), n in items])
    metric("omnigpt_requests_total", "counter", "Generation requests by outcome.",
           [({"outcome": "finished"}, s.requests_finished), ({"outcome": "cancelled"}, s.requests_cancelled),
            ({"outcome": "failed"}, s.requests_failed), ({"outcome": "rejected_queue_full"}, s.requests_rejected)])
    metric("omnigpt_prompt_tokens_total", "counter", "Prompt tokens admitted.", [(None, s.prompt_tokens)])
    metric("omnigpt_prefill_tokens_total", "counter", "Prompt tokens computed (not taken from the prefix cache).",
           [(None, s.prefilled_tokens)])
    metric("omnigpt_prefix_cache_hit_tokens_total", "counter", "Prompt tokens whose KV was copied from the prefix cache.",
           [(None, s.cached_tokens)])
    metric("omnigpt_generation_tokens_total", "counter", "Tokens sampled.", [(None, s.generated_tokens)])
    metric("omnigpt_engine_steps_total", "counter", "Engine steps (one batched forward each, or two).", [(None, s.steps)])
    metric("omnigpt_engine_busy_seconds_total", "counter", "Time the engine spent in steps (utilisation = rate).",
           [(None, round(s.busy_seconds, 6))])
    metric("omnigpt_queue_depth", "gauge", "Requests waiting for cache rows.", [(None, engine.queue_depth())])
    metric("omnigpt_running_sequences", "gauge", "Sequences in the running batch.", [(None, engine.running_sequences())])
    metric("omnigpt_kv_cache_rows_used", "gauge", "KV cache rows in use.", [(None, engine.rows_in_use())])
    metric("omnigpt_kv_cache_rows", "gauge", "KV cache rows in all.", [(None, engine.config.max_batch_size)])
    buckets = [({"le": str(b)}, c) for b, c in zip(TTFT_BUCKETS, s.ttft_buckets)] + [({"le": "+Inf"}, s.ttft_count)]
    out.append("# HELP omnigpt_time_to_first_token_seconds Time from submission to the first sampled token.")
    out.append("# TYPE omnigpt_time_to_first_token_seconds histogram")
    out.extend(_line("omnigpt_time_to_first_token_seconds_bucket", v, labels) for labels, v in buckets)
    out.append(_line("omnigpt_time_to_first_token_seconds_sum", round(s.ttft_sum, 6)))
    out.append(_line("omnigpt_time_to_first_token_seconds_count", s.ttft_count))
    metric("omnigpt_model_info", "gauge", "The served model.", [({"model": model_name}, 1)])
    return "\n".join(out) + "\n"
