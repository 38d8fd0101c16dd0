"""The serving engine: continuous batching over a slot KV cache, with streaming, prefix caching, cancellation,
n choices, logprobs and JSON-constrained decoding.

One background thread owns the model and the cache and runs steps; callers (the HTTP server's event loop, or
plain threads) submit requests and read events from a per-request queue. A step:

  1. drops cancelled requests (their rows are freed at once);
  2. admits waiting requests, first come first served, while free rows remain (n choices need n rows), copying
     the KV of the longest cached prompt prefix into the new row instead of recomputing it;
  3. prefills: one forward over admitted prompts that still have tokens to read, at most
     `prefill_chunk_tokens` per step so that a long prompt does not stall everyone else's decoding;
  4. decodes: one forward over every sequence whose last sampled token is not in the cache yet;
  5. samples the next token of every sequence that got logits in 3 or 4, streams text deltas, retires
     finished sequences.
So requests join and leave the running batch at every step. Sampling settings are per row (see sampling.py).

Requests may carry images when the engine serves a vision-language model (Engine(vlm.lm, tok, vlm=vlm)):
image_rows.py says what they change (the images' encoding at admission, their vectors in prefill, the prefix
cache stopping at the first image).

Log-probabilities are the model's own (log-softmax of the raw logits over the tokenizer's ids), before
penalties, temperature and constraints, as vLLM reports them: they score text, whatever sampled it.

Shape legend: B rows in a forward, T tokens, V vocabulary (the model's, which may exceed the tokenizer's).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from omnigpt.infer.cuda_graphs import CudaGraphDecoder
from omnigpt.infer.image_rows import ImageRows, RequestImages
from omnigpt.infer.json_constraint import JsonConstraint, JsonConstraintFactory, SchemaError, TokenVocab
from omnigpt.infer.kv_rows import CacheRows, PrefixCache, copy_slots
from omnigpt.infer.sampling import (
    SamplingParams, StopChecker, apply_penalties, filter_logits, make_generator, sample, stack_params,
)
from omnigpt.model.multimodal import VLM
from omnigpt.model.transformer import KVCache, Transformer
from omnigpt.tokenizer.text import IncrementalDecoder, Tokenizer

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20
# Attention kernels for engine forwards. Not cuDNN's: it builds a plan per new key length, and decoding makes a
# new length every step (measured on an H100, bf16, batch 1: 23 ms per step with it, see the report of issue 4).
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# ---- errors --------------------------------------------------------------------------------------------------
class EngineError(Exception):
    """Base of the errors below."""


class QueueFull(EngineError):
    """Too many requests are waiting: try again later (HTTP 429)."""


class EngineStopped(EngineError):
    """The engine is not running (HTTP 503)."""


class RequestRejected(EngineError, ValueError):
    """A request that can never run as asked (HTTP 400). `param` names the culprit for the API's error."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


# ---- configuration -------------------------------------------------------------------------------------------
@dataclass
class EngineConfig:
    max_batch_size: int = 16  # KV cache rows: sequences generating at once (a request with n choices takes n)
    max_seq_len: int | None = None  # prompt + completion per row; default the model's context
    max_queue: int = 256  # waiting requests beyond which submit() raises QueueFull
    prefix_cache_rows: int = 8  # rows keeping recent prompts' KV for reuse (part of the memory budget)
    prefix_cache_min_tokens: int = 16  # shorter prompts are not worth a row
    prefill_chunk_tokens: int = 1024  # prompt tokens read per step, across requests
    compile_decode: bool = False  # torch.compile the decode step (GPU; each new graph bucket compiles, ~40 s at 1B)
    # Decode through static-shape steps replayed as CUDA graphs (omnigpt/infer/cuda_graphs.py), one per (rows
    # bucket, cache-length bucket). None: on when the model is on CUDA. True on CPU runs the same static step
    # without capture (how the tests check it); False: the plain step, shapes following the batch.
    decode_graphs: bool | None = None
    cpu_threads: int | None = None  # intra-op threads of the engine thread (None: torch's default). On a small
    # CPU model 1 is fastest, and far faster when other processes compete for the cores.

    def kv_cache_bytes(self, cfg, dtype: torch.dtype) -> int:
        """Memory of all KV rows (decoding + prefix cache): the budget that bounds concurrency."""
        slots = (self.max_seq_len or cfg.max_seq_len) + 1
        per_row = 2 * cfg.n_layers * slots * cfg.n_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
        return (self.max_batch_size + self.prefix_cache_rows) * per_row

    @staticmethod
    def rows_for_budget(budget_bytes: int, cfg, dtype: torch.dtype, max_seq_len: int | None = None) -> int:
        """How many rows of max_seq_len fit in budget_bytes."""
        one = EngineConfig(max_batch_size=1, max_seq_len=max_seq_len, prefix_cache_rows=0)
        return max(1, budget_bytes // one.kv_cache_bytes(cfg, dtype))


# ---- requests and the events they produce ---------------------------------------------------------------------
@dataclass
class GenerationRequest:
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)  # stop_token_ids end a choice (EOS)
    n: int = 1
    logprobs: int | None = None  # report each generated token's logprob and this many alternatives (0..20)
    prompt_logprobs: int | None = None  # the same for prompt tokens (completions with echo)
    logit_bias: dict[int, float] | None = None
    json_mode: bool = False  # constrain the output to a JSON object ...
    json_schema: dict | None = None  # ... that validates against this schema
    images: torch.Tensor | None = None  # (N, C, H, W) preprocessed pixels, in the order of the prompt's <|image|>
    # placeholders (omnigpt.model.vision.preprocess); needs an engine built with a VLM


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this position, best first


@dataclass
class ChoiceDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # set on a choice's last delta: "stop" or "length"


@dataclass
class PromptLogprobs:
    tokens: list[TokenLogprob | None]  # one per prompt token; None for the first (nothing precedes it)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int  # over all choices, stop tokens included
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RequestFinished:
    usage: Usage


@dataclass
class RequestFailed:
    message: str


Event = ChoiceDelta | PromptLogprobs | RequestFinished | RequestFailed


@dataclass
class ChoiceResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class CompletedRequest:
    choices: list[ChoiceResult]
    usage: Usage | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @classmethod
    def empty(cls, n: int) -> "CompletedRequest":
        return cls([ChoiceResult() for _ in range(n)])

    def add(self, ev: Event) -> None:
        """Fold one event in (how a non-streaming caller turns the stream into a result)."""
        if isinstance(ev, ChoiceDelta):
            c = self.choices[ev.index]
            c.text += ev.text
            c.token_ids += ev.token_ids
            if ev.logprobs is not None:
                c.logprobs = (c.logprobs or []) + ev.logprobs
            c.finish_reason = ev.finish_reason or c.finish_reason
        elif isinstance(ev, PromptLogprobs):
            self.prompt_logprobs = ev.tokens
        elif isinstance(ev, RequestFinished):
            self.usage = ev.usage


class RequestHandle:
    """The caller's end of a submitted request: iterate its events (async or not), or cancel it."""

    def __init__(self, engine: "Engine", request: GenerationRequest, loop: asyncio.AbstractEventLoop | None):
        self.engine, self.request = engine, request
        self.submitted_at = time.perf_counter()
        self.cancelled = False
        self.done = False
        self._loop = loop
        self._queue: asyncio.Queue | queue.Queue = asyncio.Queue() if loop else queue.Queue()

    def _emit(self, ev: Event) -> None:
        """Deliver one event now (from any thread). The engine batches its events instead: see Engine._flush."""
        _deliver(self._loop, [(self, ev)])

    def cancel(self) -> None:
        """Stop generating (the client went away); the engine frees the rows at its next step."""
        if not self.done:
            self.cancelled = True
            self.engine._wake.set()

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        try:
            while True:
                ev = await self._queue.get()
                if isinstance(ev, (RequestFinished, RequestFailed)):
                    self.done = True
                yield ev
                if self.done:
                    return
        finally:
            self.cancel()  # no-op when done; otherwise the consumer left early (a disconnected client)

    def events(self, timeout: float | None = None):
        """Blocking iteration for callers without an event loop."""
        while True:
            ev = self._queue.get(timeout=timeout)
            if isinstance(ev, (RequestFinished, RequestFailed)):
                self.done = True
            yield ev
            if self.done:
                return

    def result(self, timeout: float | None = None) -> CompletedRequest:
        out = CompletedRequest.empty(self.request.n)
        for ev in self.events(timeout):
            if isinstance(ev, RequestFailed):
                raise EngineError(ev.message)
            out.add(ev)
        return out


def _deliver(loop: asyncio.AbstractEventLoop | None, items: list[tuple[RequestHandle, Event]]) -> None:
    if loop is None:
        for handle, ev in items:
            handle._queue.put(ev)
        return

    def put_all():
        for handle, ev in items:
            handle._queue.put_nowait(ev)

    try:
        loop.call_soon_threadsafe(put_all)  # one wake-up of the event loop per step, not one per token
    except RuntimeError:  # the caller's event loop is closed: nobody is listening
        for handle, _ in items:
            handle.cancelled = True


# ---- statistics ----------------------------------------------------------------------------------------------
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class EngineStats:
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_failed: int = 0
    requests_rejected: int = 0  # queue full
    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens actually computed (the rest came from the prefix cache)
    cached_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    busy_seconds: float = 0.0  # time spent in steps: busy_seconds / wall time is the engine's utilisation
    ttft_buckets: list[int] = field(default_factory=lambda: [0] * len(TTFT_BUCKETS))  # cumulative counts
    ttft_sum: float = 0.0
    ttft_count: int = 0

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_sum += seconds
        self.ttft_count += 1
        for i, bound in enumerate(TTFT_BUCKETS):
            if seconds <= bound:
                self.ttft_buckets[i] += 1


# ---- engine internals ----------------------------------------------------------------------------------------
class _Sequence:
    """One choice of a request, living in one cache row."""

    def __init__(self, group: "_Group", index: int, row: int, tok: Tokenizer, constraint: JsonConstraint | None):
        self.group, self.index, self.row = group, index, row
        self.pos = 0  # tokens of this sequence in its cache row
        self.pending: int | None = None  # the last sampled token, not in the cache yet
        self.n_generated = 0  # sampled tokens, stop token included
        self.decoder = IncrementalDecoder(tok)
        self.text = ""  # decoded output so far
        self.sent = 0  # characters of text already streamed (the rest may be the start of a stop string)
        self.constraint = constraint
        seed = group.request.params.seed
        # Each choice has its own stream; torch seeds are 64-bit, request seeds any integer.
        self.generator = None if seed is None else make_generator((seed + index) % 2**64, group.device)
        self.finished = False


class _Group:
    """A request's sequences. The first one's row reads the prompt; the others copy its KV when it is done."""

    def __init__(self, request: GenerationRequest, handle: RequestHandle, device):
        self.request, self.handle, self.device = request, handle, device
        self.seqs: list[_Sequence] = []
        self.prefilled = 0  # prompt tokens in the first sequence's row
        self.cached = 0  # of which copied from the prefix cache
        self.prompt_lps: list[TokenLogprob | None] = [None]
        self.images: RequestImages | None = None  # encoded at admission
        self.started = False  # first token sampled
        self.stop_ids = frozenset(request.params.stop_token_ids)
        self.stop_checker = StopChecker(request.params.stop)
        self.max_stop_len = max((len(s) for s in request.params.stop), default=0)
        p = request.params
        self.uses_penalties = p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.request.prompt)


class Engine:
    """Continuous-batching generation over one model. start() it, submit() requests, stop() it."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig | None = None,
                 vlm: VLM | None = None):
        """vlm: a VLM whose language model is `model`; then requests may carry images."""
        if vlm is not None and vlm.lm is not model:
            raise ValueError("the engine's model must be the VLM's language model (vlm.lm)")
        if vlm is not None and vlm.cfg.mrope:  # the engine's prefill gives image tokens 1-D positions
            raise ValueError("this VLM was trained with 2-D image positions (mrope=True), which the serving engine does "
                             "not implement yet; answers would be wrong, so it is not served")
        self.images = ImageRows(vlm) if vlm is not None else None
        self.model = model.eval()
        self.tok = tokenizer
        self.config = config = config or EngineConfig()
        cfg = model.cfg
        self.device = model.head_weight().device
        self.dtype = model.head_weight().dtype
        self.vocab_size = cfg.vocab_size
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model only {cfg.vocab_size}")
        self.max_seq_len = min(config.max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
        self.parking_slot = self.max_seq_len  # where padding tokens write: past every real position
        rows = config.max_batch_size
        self.cache = KVCache(cfg, rows, self.max_seq_len + 1, device=self.device, dtype=self.dtype)
        self.prefix = PrefixCache(cfg, config.prefix_cache_rows, self.max_seq_len + 1, self.device, self.dtype,
                                  config.prefix_cache_min_tokens)
        self.free_rows = list(range(rows))  # kept sorted: the lowest rows are reused first (denser batches)
        # Output tokens may only be text (specials other than a request's stop tokens would be gibberish).
        self.text_mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
        self.text_mask[: tokenizer.n_text] = True
        self._byte_token = [tokenizer.encode_bytes(bytes([b]))[0] for b in range(256)]  # each byte's own token
        # Per-row token history for presence/frequency/repetition penalties (kept only for rows that use them).
        self.seen = torch.zeros(rows, self.vocab_size, dtype=torch.bool, device=self.device)
        self.counts = torch.zeros(rows, self.vocab_size, dtype=torch.int32, device=self.device)
        self.stats = EngineStats()
        self._waiting: deque[_Group] = deque()
        self._active: list[_Group] = []
        self._lock = threading.Lock()  # guards _waiting (submit and cancel run on other threads)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._json: JsonConstraintFactory | None = None
        self._outbox: list[tuple[RequestHandle, Event]] = []  # events of the current step, sent at its end
        self._json_lock = threading.Lock()
        self._decode_model = self.model
        use_graphs = self.device.type == "cuda" if config.decode_graphs is None else config.decode_graphs
        # Row buckets 1, 2, 4, ... rows: the lowest free rows are used first, so live rows sit at the bottom.
        self._row_buckets = sorted({min(2 ** i, rows) for i in range(rows.bit_length() + 1)}) if use_graphs else []
        self._graph_decoders: dict[int, CudaGraphDecoder] = {}
        if config.compile_decode and not use_graphs:
            self._decode_model = torch.compile(self.model, dynamic=True)

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="omnigpt-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with self._lock:
            groups = list(self._waiting) + self._active
            self._waiting.clear()
            self._active = []
        for g in groups:
            g.handle._emit(RequestFailed("the server is shutting down"))

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stopping

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- what callers use --------------------------------------------------------------------------------------
    def json_constraints(self) -> JsonConstraintFactory:
        """The token masks' vocabulary is built on first use (a few seconds for a 100k vocabulary)."""
        with self._json_lock:
            if self._json is None:
                self._json = JsonConstraintFactory(TokenVocab.from_tokenizer(self.tok, self.vocab_size))
            return self._json

    def prepare(self, request: GenerationRequest) -> None:
        """Checks that need no engine state; the slow parts (JSON grammar) are cached for submit().
        Call it off the event loop; raises RequestRejected."""
        n_prompt = len(request.prompt)
        if n_prompt == 0:
            raise RequestRejected("the prompt is empty", param="prompt")
        if min(request.prompt) < 0 or max(request.prompt) >= self.tok.vocab_size:
            raise RequestRejected(f"prompt token ids must be in [0, {self.tok.vocab_size})", param="prompt")
        if n_prompt >= self.max_seq_len:
            raise RequestRejected(
                f"the prompt has {n_prompt} tokens; this model's context is {self.max_seq_len} tokens, "
                "and at least one must be left for the answer", param="messages", code="context_length_exceeded")
        if n_prompt + request.params.max_new_tokens > self.max_seq_len:
            raise RequestRejected(
                f"prompt ({n_prompt} tokens) + max_tokens ({request.params.max_new_tokens}) exceeds this model's "
                f"context of {self.max_seq_len} tokens", param="max_tokens", code="context_length_exceeded")
        if not 1 <= request.n <= self.config.max_batch_size:
            raise RequestRejected(f"n must be between 1 and {self.config.max_batch_size} on this server", param="n")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(request, name)
            if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
                raise RequestRejected(f"{name} must be between 0 and {MAX_TOP_LOGPROBS}", param=name)
        if request.logit_bias and any(not 0 <= t < self.vocab_size for t in request.logit_bias):
            raise RequestRejected(f"logit_bias token ids must be in [0, {self.vocab_size})", param="logit_bias")
        if request.images is not None and len(request.images) and self.images is None:
            raise RequestRejected("this model cannot read images (it has no vision encoder); send text only",
                                  param="messages", code="image_input_not_supported")
        if self.images is not None:
            problem = self.images.check(request.prompt, request.images)
            if problem:
                raise RequestRejected(problem, param="messages")
        if request.json_mode or request.json_schema is not None:
            try:
                self.json_constraints().make(request.json_schema)
            except SchemaError as e:
                raise RequestRejected(f"response_format: {e}", param="response_format") from e

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request. Raises RequestRejected, QueueFull or EngineStopped. Inside an event loop, iterate
        the handle with `async for`; elsewhere use handle.events() or handle.result()."""
        if not self.running:
            raise EngineStopped("the engine is not running")
        self.prepare(request)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        handle = RequestHandle(self, request, loop)
        group = _Group(request, handle, self.device)
        with self._lock:
            if len(self._waiting) >= self.config.max_queue:
                self.stats.requests_rejected += 1
                raise QueueFull(f"{len(self._waiting)} requests are already waiting; try again later")
            self._waiting.append(group)
        self._wake.set()
        return handle

    def generate(self, prompt: list[int], params: SamplingParams | None = None, **kw) -> CompletedRequest:
        """Blocking convenience: submit and wait for the result."""
        return self.submit(GenerationRequest(prompt, params or SamplingParams(), **kw)).result()

    def queue_depth(self) -> int:
        return len(self._waiting)

    def running_sequences(self) -> int:
        return sum(1 for g in self._active for s in g.seqs if not s.finished)

    def rows_in_use(self) -> int:
        return self.config.max_batch_size - len(self.free_rows)

    # -- the loop ----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)  # per thread
        if self.config.cpu_threads:
            torch.set_num_threads(self.config.cpu_threads)  # with OpenMP, this thread's own setting
        while not self._stopping:
            self._wake.clear()
            if not self._active and not self._waiting:
                self._wake.wait(timeout=1.0)
                continue
            started = time.perf_counter()
            try:
                self.step()
            except Exception as e:  # a bug or out-of-memory: fail what was running, keep serving
                log.exception("engine step failed")
                self._fail_active(f"internal error during generation: {type(e).__name__}: {e}")
            finally:
                self._flush()  # what a failed step managed to say, and the failures
                self.stats.busy_seconds += time.perf_counter() - started

    def step(self) -> None:
        self.stats.steps += 1
        self._drop_cancelled()
        self._admit()
        ready: list[_Sequence] = []  # sequences to sample for, in the order of the logits rows below
        logits: list[torch.Tensor] = []
        prefilling = [g for g in self._active if g.prefilling]
        decoding = [s for g in self._active if not g.prefilling for s in g.seqs if s.pending is not None]
        if prefilling:
            for g, last_logits in self._prefill(prefilling):
                seqs = self._finish_prefill(g)
                ready += seqs
                logits += [last_logits] * len(seqs)  # n choices sample from the same first distribution
        if decoding:
            ready += decoding
            logits += list(self._decode(decoding))
        if ready:
            self._sample(ready, torch.stack(logits))
        self._flush()

    def _send(self, handle: RequestHandle, ev: Event) -> None:
        self._outbox.append((handle, ev))

    def _flush(self) -> None:
        """Hand this step's events to their callers, one batch per event loop."""
        by_loop: dict = {}
        for handle, ev in self._outbox:
            by_loop.setdefault(handle._loop, []).append((handle, ev))
        self._outbox = []
        for loop, items in by_loop.items():
            _deliver(loop, items)

    # -- admission and retirement ------------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        with self._lock:
            for g in [g for g in self._waiting if g.handle.cancelled]:
                self._waiting.remove(g)
                self.stats.requests_cancelled += 1
        for g in [g for g in self._active if g.handle.cancelled]:
            for s in g.seqs:
                self._release(s)
            self._active.remove(g)
            self.stats.requests_cancelled += 1

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._waiting or len(self.free_rows) < self._waiting[0].request.n:
                    return
                g = self._waiting.popleft()
            req = g.request
            if req.images is not None and len(req.images):
                try:
                    g.images = self.images.encode(req.prompt, req.images)
                except Exception as e:  # out of memory, say: this request fails, the others go on
                    log.exception("encoding a request's images failed")
                    self._send(g.handle, RequestFailed(f"internal error while reading the images: {type(e).__name__}: {e}"))
                    self.stats.requests_failed += 1
                    continue
            rows, self.free_rows = self.free_rows[: req.n], self.free_rows[req.n:]
            make = self.json_constraints().make if (req.json_mode or req.json_schema is not None) else None
            g.seqs = [_Sequence(g, i, row, self.tok, make(req.json_schema) if make else None) for i, row in enumerate(rows)]
            if g.uses_penalties:
                for s in g.seqs:
                    self.seen[s.row] = False
                    self.seen[s.row, torch.tensor(req.prompt, device=self.device)] = True
                    self.counts[s.row] = 0
            if req.prompt_logprobs is None:  # prompt logprobs need every position computed
                src_row, n = self.prefix.lookup(req.prompt)
                n = min(n, len(req.prompt) - 1)  # the last prompt token is always run: its logits start decoding
                if self.images is not None:
                    n = min(n, self.images.reusable_prefix(req.prompt))
                if n > 0:
                    copy_slots(self.prefix.cache, src_row, self.cache, g.seqs[0].row, n)
                    g.prefilled = g.cached = n
            self.stats.prompt_tokens += len(req.prompt)
            self.stats.cached_tokens += g.cached
            self._active.append(g)

    def _release(self, s: _Sequence) -> None:
        if not s.finished:
            s.finished = True
            bisect.insort(self.free_rows, s.row)

    def _finish(self, s: _Sequence, reason: str, flush: bool = True) -> None:
        """A choice is complete: stream what is left of its text, free its row, and end the request with it.
        flush=False after a stop string: nothing after it is output, not even an incomplete character."""
        g = s.group
        if flush:
            s.text += s.decoder.flush()
        text = s.text[s.sent:]
        s.sent = len(s.text)
        self._release(s)
        self._send(g.handle, ChoiceDelta(s.index, text, [], [] if g.request.logprobs is not None else None, reason))
        if all(x.finished for x in g.seqs):
            self._active.remove(g)
            self.stats.requests_finished += 1
            usage = Usage(len(g.prompt), sum(x.n_generated for x in g.seqs), g.cached)
            self._send(g.handle, RequestFinished(usage))

    def _fail_active(self, message: str) -> None:
        for g in list(self._active):
            for s in g.seqs:
                self._release(s)
            self._send(g.handle, RequestFailed(message))
            self.stats.requests_failed += 1
        self._active = []

    # -- forward passes ----------------------------------------------------------------------------------------
    def _prefill(self, groups: list[_Group]) -> list[tuple[_Group, torch.Tensor]]:
        """Read the next chunk of some prompts; return (group, next-token logits) for prompts now complete.

        Rows are right-aligned on their last token so that the model's last_only logits are each row's last
        real token; the padding between sits at the parking slot, past every real position, so nobody
        attends to it. A request that wants prompt logprobs runs alone with logits at every position.
        """
        budget = self.config.prefill_chunk_tokens
        batch: list[tuple[_Group, int]] = []
        for g in groups:
            wants_lps = g.request.prompt_logprobs is not None
            if wants_lps and batch:
                continue  # it runs alone in a later step
            take = min(len(g.prompt) - g.prefilled, budget - sum(c for _, c in batch))
            if take <= 0:
                break
            batch.append((g, take))
            if wants_lps:
                break
        T = max(c for _, c in batch)
        tokens = torch.zeros(len(batch), T, dtype=torch.long)
        pos = torch.full((len(batch), T), self.parking_slot, dtype=torch.long)
        for b, (g, c) in enumerate(batch):
            ids = torch.tensor(g.prompt[g.prefilled: g.prefilled + c])
            where = torch.arange(g.prefilled, g.prefilled + c)
            tokens[b, : c - 1], pos[b, : c - 1] = ids[:-1], where[:-1]
            tokens[b, -1], pos[b, -1] = ids[-1], where[-1]
        wants_lps = batch[0][0].request.prompt_logprobs is not None
        view = CacheRows(self.cache, [g.seqs[0].row for g, _ in batch])
        with sdpa_kernel(ATTENTION_BACKENDS):
            if any(g.images is not None for g, _ in batch):
                out = self.images.forward(self.model, tokens.to(self.device), pos.to(self.device), view,
                                          [g.images for g, _ in batch], [(g.prefilled, c) for g, c in batch],
                                          last_only=not wants_lps).logits
            else:
                out = self.model(tokens.to(self.device), pos_BT=pos.to(self.device), cache=view,
                                 last_only=not wants_lps).logits
        done = []
        for b, (g, c) in enumerate(batch):
            if wants_lps:
                self._record_prompt_logprobs(g, out[b].float(), c)
            g.prefilled += c
            self.stats.prefilled_tokens += c
            if not g.prefilling:
                done.append((g, out[b, -1].float()))
        return done

    def _record_prompt_logprobs(self, g: _Group, logits_TV: torch.Tensor, c: int) -> None:
        """Logits at prompt position p score prompt token p+1."""
        start = g.prefilled
        targets = g.prompt[start + 1: start + c + 1]
        if not targets:
            return
        lp_TV = logits_TV[: len(targets), : self.tok.vocab_size].log_softmax(-1)
        g.prompt_lps += _token_logprobs(lp_TV, torch.tensor(targets, device=lp_TV.device), g.request.prompt_logprobs)

    def _finish_prefill(self, g: _Group) -> list[_Sequence]:
        """The prompt is in the first row: share it with the other choices and the prefix cache."""
        first = g.seqs[0]
        P = len(g.prompt)
        for s in g.seqs[1:]:
            copy_slots(self.cache, first.row, self.cache, s.row, P)
        for s in g.seqs:
            s.pos = P
        self.prefix.store(g.prompt, self.cache, first.row)
        if g.request.prompt_logprobs is not None:
            self._send(g.handle, PromptLogprobs(g.prompt_lps))
        if g.request.params.max_new_tokens == 0:  # echo only: nothing to generate
            for s in list(g.seqs):
                self._finish(s, "length")
            return []
        return g.seqs

    def _decode(self, seqs: list[_Sequence]) -> torch.Tensor:
        """One token per sequence: write each pending token at its position, return the next logits (B, V)."""
        tokens = torch.tensor([[s.pending] for s in seqs], device=self.device)
        pos = torch.tensor([[s.pos] for s in seqs], device=self.device)
        rows = [s.group.images for s in seqs]
        if any(r is not None for r in rows) and self.images.decode_needs_images:
            with sdpa_kernel(ATTENTION_BACKENDS):  # eager: the media change with the rows
                logits = self.images.forward(self.model, tokens, pos, CacheRows(self.cache, [s.row for s in seqs]),
                                             rows).logits[:, -1]
        elif self._row_buckets:
            logits = self._decode_static(seqs, tokens, pos)
        else:
            logits = self._decode_text(seqs, tokens, pos)
        for s in seqs:
            s.pos += 1
            s.pending = None
        return logits.float()

    def _decode_text(self, seqs: list[_Sequence], tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        view = CacheRows(self.cache, [s.row for s in seqs])
        try:
            with sdpa_kernel(ATTENTION_BACKENDS):
                return self._decode_model(tokens, pos_BT=pos, cache=view).logits[:, -1]
        except Exception:
            if self._decode_model is self.model:
                raise
            log.exception("compiled decode step failed; falling back to eager")
            self._decode_model = self.model
            with sdpa_kernel(ATTENTION_BACKENDS):
                return self.model(tokens, pos_BT=pos, cache=view).logits[:, -1]

    def _decode_static(self, seqs: list[_Sequence], tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The decode step over rows 0..n-1 of the cache (n: the rows bucket holding every live row), idle rows
        writing into the parking slot; the same static shapes every step, so it replays as a CUDA graph."""
        live = [s.row for s in seqs]
        n = next(b for b in self._row_buckets if b > max(live))
        try:
            dec = self._graph_decoders.get(n)
            if dec is None:
                # torch.compile'd kernels pay at small batches; at 128 rows the eager ones were faster (H100).
                compile = self.config.compile_decode and n <= 32
                dec = self._graph_decoders[n] = CudaGraphDecoder(self.model, n, self.max_seq_len, compile=compile,
                                                                 cache=self.cache, graphs=self.device.type == "cuda")
            rows = torch.tensor(live, device=self.device)
            all_tokens = torch.zeros(n, dtype=torch.long, device=self.device).index_copy_(0, rows, tokens.view(-1))
            all_pos = torch.full((n,), self.parking_slot, dtype=torch.long, device=self.device).index_copy_(0, rows, pos.view(-1))
            with sdpa_kernel(ATTENTION_BACKENDS):
                return dec.step(all_tokens, all_pos, max(s.pos for s in seqs)).index_select(0, rows)
        except Exception:
            log.exception("static (CUDA-graph) decode step failed; decoding with the plain step from now on")
            self._row_buckets = []
            return self._decode_text(seqs, tokens, pos)

    # -- sampling ----------------------------------------------------------------------------------------------
    def _sample(self, seqs: list[_Sequence], raw_BV: torch.Tensor) -> None:
        params = [s.group.request.params for s in seqs]
        settings = stack_params(params, self.device)
        logits = raw_BV
        if any(s.group.uses_penalties for s in seqs):
            rows = torch.tensor([s.row for s in seqs], device=self.device)
            logits = apply_penalties(logits, self.seen[rows], self.counts[rows], settings["repetition_penalty"],
                                     settings["presence_penalty"], settings["frequency_penalty"])
        bias = self._logit_bias(seqs)
        if bias is not None:
            logits = logits + bias
        allowed = self._allowed(seqs)
        logits = _finite(logits.masked_fill(~allowed, float("-inf")), allowed)
        logits = filter_logits(logits, settings["temperature"], settings["top_k"], settings["top_p"], settings["min_p"])
        next_B = sample(_finite(logits, allowed), [p.greedy for p in params], [s.generator for s in seqs])
        for b, s in enumerate(seqs):
            if s.constraint is not None:
                next_B[b] = self._keep_json_finishable(s, int(next_B[b]))

        lps: list[TokenLogprob | None] = [None] * len(seqs)
        want = [s.group.request.logprobs for s in seqs]
        if any(k is not None for k in want):
            lp_BV = raw_BV[:, : self.tok.vocab_size].log_softmax(-1)  # over real tokens, not the padding rows
            infos = _token_logprobs(lp_BV, next_B, max(k or 0 for k in want))
            lps = [None if k is None else TokenLogprob(i.token, i.logprob, i.top[:k]) for i, k in zip(infos, want)]

        now = time.perf_counter()
        penalised = []
        for s, token, lp in zip(seqs, next_B.tolist(), lps):
            g = s.group
            if not g.started:
                g.started = True
                self.stats.observe_ttft(now - g.handle.submitted_at)
            self._accept(s, token, lp)
            if g.uses_penalties:
                penalised.append((s.row, token))
        if penalised:
            rows, toks = (torch.tensor(x, device=self.device) for x in zip(*penalised))
            self.seen[rows, toks] = True
            self.counts.index_put_((rows, toks), torch.ones_like(rows, dtype=self.counts.dtype), accumulate=True)

    def _logit_bias(self, seqs: list[_Sequence]) -> torch.Tensor | None:
        entries = [(b, t, v) for b, s in enumerate(seqs) for t, v in (s.group.request.logit_bias or {}).items()]
        if not entries:
            return None
        rows, tokens, values = zip(*entries)
        bias = torch.zeros(len(seqs), self.vocab_size, device=self.device)
        bias[list(rows), list(tokens)] = torch.tensor(values, device=self.device)
        return bias

    def _allowed(self, seqs: list[_Sequence]) -> torch.Tensor:
        """(B, V): text tokens and the request's stop tokens; for JSON, what keeps the output valid."""
        allowed = self.text_mask.expand(len(seqs), -1).clone()
        stops = [(b, t) for b, s in enumerate(seqs) if s.constraint is None for t in s.group.stop_ids]
        if stops:
            rows, tokens = zip(*stops)
            allowed[list(rows), list(tokens)] = True
        for b, s in enumerate(seqs):
            if s.constraint is not None:  # stop tokens stay out: a finished document ends the choice itself
                allowed[b] = s.constraint.allowed().to(self.device)
        return allowed

    def _keep_json_finishable(self, s: _Sequence, token: int) -> int:
        """The sampled token, unless it would leave too few tokens to close the JSON document: then the next
        byte of the shortest completion (one byte per token, so the bound is exact and always reachable)."""
        budget = s.group.request.params.max_new_tokens - s.n_generated - 1  # tokens left after this one
        state = s.constraint.grammar.accepts(self.tok.token_bytes(token), s.constraint.state)
        if state is not None and len(s.constraint.grammar.completion(state)) <= budget:
            return token
        return self._byte_token[s.constraint.completion()[0]]

    def _accept(self, s: _Sequence, token: int, lp: TokenLogprob | None) -> None:
        """Stream a sampled token's text; finish the choice on a stop token, stop string, budget or done JSON."""
        g = s.group
        s.n_generated += 1
        self.stats.generated_tokens += 1
        if token in g.stop_ids:
            self._finish(s, "stop")
            return
        if s.constraint is not None:
            s.constraint.advance(token)
        s.text += s.decoder.feed(token)
        text, stopped = self._release_text(s)
        self._send(g.handle, ChoiceDelta(s.index, text, [token], None if lp is None else [lp]))
        if stopped or (s.constraint is not None and s.constraint.done):
            self._finish(s, "stop", flush=not stopped)
        elif s.n_generated >= g.request.params.max_new_tokens:
            self._finish(s, "length")
        else:
            s.pending = token

    @staticmethod
    def _release_text(s: _Sequence) -> tuple[str, bool]:
        """(text safe to stream now, whether a stop string was hit). Text that could be the start of a stop
        string is held back until the next tokens tell; a stop string and whatever follows it are dropped.
        No stop string can start before s.sent: it would have been held back."""
        g = s.group
        if not g.max_stop_len:
            text, s.sent = s.text[s.sent:], len(s.text)
            return text, False
        hit = g.stop_checker.find(s.text[s.sent:])
        if hit is not None:
            text = s.text[s.sent: s.sent + hit]
            s.text = s.text[: s.sent + hit]
            s.sent = len(s.text)
            return text, True
        hold = 0
        for k in range(min(g.max_stop_len - 1, len(s.text) - s.sent), 0, -1):
            if any(stop.startswith(s.text[-k:]) for stop in g.request.params.stop):
                hold = k
                break
        end = len(s.text) - hold
        text = s.text[s.sent: end]
        s.sent = max(s.sent, end)
        return text, False


def _finite(logits_BV: torch.Tensor, allowed_BV: torch.Tensor) -> torch.Tensor:
    """Extreme settings overflow or empty a row: a temperature or repetition penalty of 1e-300 makes inf or nan,
    a top_p of 1e-100 (0 in float32) masks every token. Read +inf as "certain" (keep only those tokens) and nan
    as impossible; a row left with nothing falls back to its allowed tokens."""
    finite = torch.isfinite(logits_BV)
    if bool((finite | (logits_BV == float("-inf"))).all() & finite.any(dim=-1).all()):
        return logits_BV  # the usual case, one check
    logits_BV = torch.nan_to_num(logits_BV, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    certain = logits_BV == float("inf")
    rows = certain.any(dim=-1, keepdim=True)
    logits_BV = torch.where(rows, torch.where(certain, 0.0, float("-inf")), logits_BV)
    empty = (logits_BV == float("-inf")).all(dim=-1, keepdim=True)
    return torch.where(empty, torch.where(allowed_BV, 0.0, float("-inf")), logits_BV)


def _token_logprobs(lp_BV: torch.Tensor, tokens_B: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Each row's logprob of its token, and its k most likely tokens."""
    chosen = lp_BV.gather(1, tokens_B.view(-1, 1)).view(-1).tolist()
    if k:
        top_v, top_i = lp_BV.topk(k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(top_i.tolist(), top_v.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(tokens_B.tolist(), chosen, tops)]
