"""The OpenAI-compatible HTTP API (FastAPI) and the web chat page.

    GET  /v1/models              the served model (and its aliases)
    POST /v1/chat/completions    chat, streamed over SSE or not
    POST /v1/completions         text completion, with echo + prompt logprobs for log-likelihood evaluation
    GET  /health, GET /metrics   liveness; Prometheus text
    GET  /                       the web chat page (static/index.html)

Requests are validated and tokenized here, then handed to the engine (omnigpt.infer.engine), whose events
are turned into OpenAI's JSON or SSE chunks. Errors have OpenAI's shape (errors.py).

A vision-language checkpoint (ServedModel.vlm) reads `image_url` parts: each data URL is decoded within
ImageLimits (images.py), resized and normalised as in training (omnigpt.model.vision.preprocess), and stands in
the chat as `<|image_start|>`, the model's `<|image|>` placeholders, `<|image_end|>` (render_chat), all counted in
prompt_tokens; the engine splices the images in (omnigpt.infer.image_rows). A text-only model checks image parts
as carefully, then answers them with a 400 `image_input_not_supported`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from omnigpt.infer.engine import (
    ChoiceDelta, CompletedRequest, Engine, EngineConfig, EngineStopped, GenerationRequest, PromptLogprobs,
    QueueFull, RequestFailed, RequestFinished, RequestHandle, RequestRejected, TokenLogprob, Usage,
)
from omnigpt.infer.sampling import SamplingParams
from omnigpt.model.vision import preprocess
from omnigpt.serve import protocol as P
from omnigpt.serve.checkpoint import ServedModel
from omnigpt.serve.errors import APIError, install_error_handlers
from omnigpt.serve.images import ImageError, ImageLimits, decode_data_url
from omnigpt.serve.metrics import HTTPStats, CountResponses, render
from omnigpt.tokenizer.chat import render_chat
from omnigpt.tokenizer.text import IncrementalDecoder

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY = 16 * 1024 * 1024  # room for a few inline images
FINGERPRINT = "fp_omnigpt"
ERRORS = {code: {"model": P.ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)}


def sse_doc(chunk: str) -> dict:
    """OpenAPI 3.1 describes each server-sent event: its data is a JSON `chunk` (or an error, which ends the
    stream), or the final [DONE]."""
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
        {"$ref": f"#/components/schemas/{chunk}"}, {"$ref": "#/components/schemas/ErrorResponse"}]}}
    event = {"type": "object", "required": ["data"], "properties": {
        "data": {"anyOf": [{"const": "[DONE]"}, json_data]}, "event": {"type": "string"}}}
    return {200: {"content": {"text/event-stream": {"schema": event}},
                  "description": f"JSON; with stream=true, server-sent events of {chunk} ending with `data: [DONE]`"}}


@dataclass
class ServingState:
    served: ServedModel
    engine: Engine
    names: list[str]
    api_key: str | None
    image_limits: ImageLimits = ImageLimits()
    created: int = field(default_factory=lambda: int(time.time()))
    http: HTTPStats = field(default_factory=HTTPStats)

    @property
    def tok(self):
        return self.served.tokenizer


# ---- the app -------------------------------------------------------------------------------------------------
def create_app(served: ServedModel, engine_config: EngineConfig | None = None, *, api_key: str | None = None,
               model_names: list[str] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY,
               image_limits: ImageLimits = ImageLimits()) -> FastAPI:
    """model_names: the ids clients may pass as `model` (default: the checkpoint's name)."""
    engine = Engine(served.model, served.tokenizer, engine_config, vlm=served.vlm)
    state = ServingState(served, engine, list(model_names or [served.name]), api_key, image_limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await run_in_threadpool(engine.stop)

    app = FastAPI(title="omnigpt", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for omnigpt models, and a web chat page at /.")
    app.state.serving = state
    install_error_handlers(app)
    _document_limits(app, state)
    # Outermost first: count every response, then refuse big bodies and missing keys before any parsing.
    app.add_middleware(RequireKey, api_key=api_key)
    app.add_middleware(LimitBody, max_bytes=max_body_bytes)
    app.add_middleware(CountResponses, stats=state.http)
    _add_routes(app, state)
    return app


def _add_routes(app: FastAPI, state: ServingState) -> None:
    engine = state.engine

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health", response_model=P.Health)
    async def health():
        if not engine.running:
            raise APIError(503, "the engine is not running")
        return {"status": "ok", "model": state.names[0]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(render(engine, state.http, state.names[0]), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=P.ModelList, responses=ERRORS)
    async def list_models():
        return {"object": "list", "data": [_model_card(state, n) for n in state.names]}

    @app.get("/v1/models/{model_id}", response_model=P.ModelCard, responses=ERRORS)
    async def get_model(model_id: str):
        _check_model(state, model_id)
        return _model_card(state, model_id)

    @app.post("/v1/chat/completions", response_model=P.ChatCompletion,
              responses={**ERRORS, **sse_doc("ChatCompletionChunk")})
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        _check_model(state, body.model)
        _check_limits(state, body, ("max_tokens", "max_completion_tokens"))
        prompt, images = await run_in_threadpool(chat_prompt, state, body.messages)
        want_lps = bool(body.logprobs)
        if body.top_logprobs and not want_lps:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        fmt = body.response_format
        if fmt is not None and fmt.type == "json_schema" and (fmt.json_schema is None or fmt.json_schema.schema_ is None):
            raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
        gen = GenerationRequest(
            prompt=prompt,
            params=sampling_params(state, body, len(prompt), body.max_completion_tokens or body.max_tokens,
                                   (state.tok.im_end_id, state.tok.eot_id)),
            n=body.n,
            logprobs=(body.top_logprobs or 0) if want_lps else None,
            logit_bias=logit_bias(body.logit_bias),
            json_mode=fmt is not None and fmt.type == "json_object",
            json_schema=fmt.json_schema.schema_ if fmt is not None and fmt.type == "json_schema" else None,
            images=images,
        )
        handle = await submit(engine, gen)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model,
                "system_fingerprint": FINGERPRINT}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return sse_response(chat_stream(state, handle, head, body.n, include_usage, want_lps))
        [result] = await collect([handle], request, body.n)
        return JSONResponse(chat_completion_body(state, head, result, want_lps))

    @app.post("/v1/completions", response_model=P.Completion, responses={**ERRORS, **sse_doc("Completion")})
    async def completions(body: P.CompletionRequest, request: Request):
        _check_model(state, body.model)
        _check_limits(state, body, ("max_tokens",))
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of must equal n (no server-side ranking)", param="best_of")
        prompts = await run_in_threadpool(completion_prompts, state, body.prompt)
        gens = [GenerationRequest(
            prompt=ids,
            params=sampling_params(state, body, len(ids), body.max_tokens, (state.tok.eot_id,)),
            n=body.n,
            logprobs=body.logprobs,
            prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None else None,
            logit_bias=logit_bias(body.logit_bias),
        ) for _, ids in prompts]
        handles = []
        try:
            for gen in gens:
                handles.append(await submit(engine, gen, prompt_param="prompt"))
        except APIError:
            for h in handles:
                h.cancel()
            raise
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model,
                "system_fingerprint": FINGERPRINT}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return sse_response(completion_stream(state, handles, prompts, head, body, include_usage))
        results = await collect(handles, request, body.n)
        return JSONResponse(completion_body(state, head, prompts, results, body))


def _check_limits(state: ServingState, body, token_fields: tuple[str, ...]) -> None:
    """The bounds _document_limits publishes, enforced even on fields a request does not end up using."""
    for name in token_fields:
        value = getattr(body, name)
        if value is not None and value > state.engine.max_seq_len - 1:
            raise APIError(400, f"{name}={value} exceeds this model's context of {state.engine.max_seq_len} tokens",
                           param=name, code="context_length_exceeded")


def _document_limits(app: FastAPI, state: ServingState) -> None:
    """Put what this server accepts into /openapi.json: its model ids, n up to its rows, max_tokens up to its
    context (pydantic only knows OpenAI's static bounds); and the stream chunks' schema."""
    generate_schema = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate_schema()
        components = schema["components"]["schemas"]
        chunk = P.ChatCompletionChunk.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(chunk.pop("$defs", {}))
        components["ChatCompletionChunk"] = chunk
        engine = state.engine
        for name in ("ChatCompletionRequest", "CompletionRequest"):
            props = schema["components"]["schemas"][name]["properties"]
            props["model"]["enum"] = list(state.names)
            _set_integer_bounds(props["n"], maximum=engine.config.max_batch_size)
            for key in ("max_tokens", "max_completion_tokens"):
                if key in props:
                    _set_integer_bounds(props[key], maximum=engine.max_seq_len - 1)
            if "best_of" in props:
                _set_integer_bounds(props["best_of"], maximum=engine.config.max_batch_size)
        return schema

    app.openapi = openapi


def _set_integer_bounds(prop: dict, maximum: int) -> None:
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == "integer":
            branch["maximum"] = maximum


def _model_card(state: ServingState, name: str) -> dict:
    return {"id": name, "object": "model", "created": state.created, "owned_by": "omnigpt"}


def _check_model(state: ServingState, name: str) -> None:
    if name not in state.names:
        raise APIError(404, f"the model {name!r} does not exist on this server; it serves {', '.join(state.names)}",
                       param="model", code="model_not_found")


# ---- middleware ----------------------------------------------------------------------------------------------
class RequireKey:
    """With an API key set, /v1/* needs `Authorization: Bearer <key>` (the page, /health and /metrics do not)."""

    def __init__(self, app, api_key: str | None):
        self.app, self.key = app, api_key

    async def __call__(self, scope, receive, send):
        if self.key is None or scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key.encode()):
            return await self.app(scope, receive, send)
        await _drain(receive)
        response = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                            code="invalid_api_key").response()
        await response(scope, receive, send)


class LimitBody:
    """413 for bodies over max_bytes, declared or streamed. The body is read here (up to the limit) and
    replayed to the app; an oversized one is drained (bounded) so the client reads our answer, not a reset."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.max_bytes
        chunks, size = [], 0
        while not too_big:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            too_big = size > self.max_bytes
            if not message.get("more_body"):
                break
        if too_big:
            await _drain(receive, limit=8 * self.max_bytes)
            response = APIError(413, f"the request body is larger than this server's limit of {self.max_bytes} bytes",
                                code="request_too_large").response()
            return await response(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: http.disconnect when the client goes away

        await self.app(scope, replay, send)


async def _drain(receive, limit: int = 1 << 30) -> None:
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return
        seen += len(message.get("body", b""))


# ---- requests -> engine --------------------------------------------------------------------------------------
def chat_prompt(state: ServingState, messages: list[P.ChatMessage]):
    """(ChatML token ids ending with the assistant's turn opening, the images' pixels or None). Images are decoded
    and checked first, then refused if the model cannot see."""
    vlm, limits = state.served.vlm, state.image_limits
    plain, images = [], []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            content = []
            for j, part in enumerate(m.content):
                if isinstance(part, P.TextPart):
                    content.append({"type": "text", "text": part.text})
                    continue
                param = f"messages[{i}].content[{j}].image_url.url"
                if len(images) == limits.max_images:
                    raise APIError(400, f"{param}: at most {limits.max_images} images per request", param=param,
                                   code="too_many_images")
                try:
                    image = decode_data_url(part.image_url.url, limits)
                except ImageError as e:
                    raise APIError(400, f"{param}: {e}", param=param, code="invalid_image") from e
                if vlm is None:
                    raise APIError(400, f"the model {state.names[0]!r} cannot read images (it has no vision encoder); "
                                   "send text only", param=param, code="image_input_not_supported")
                images.append(preprocess([image], vlm.cfg.vision))  # at once: one full-size image in memory at most
                content.append({"type": "image_url", "image_url": {"url": part.image_url.url}})
        plain.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    ids, _ = render_chat(state.tok, plain, add_generation_prompt=True, image_tokens=vlm.cfg.image_tokens if vlm else 0,
                         images_first=bool(vlm and vlm.cfg.image_first))
    return ids, (torch.cat(images) if images else None)


def completion_prompts(state: ServingState, prompt) -> list[tuple[str, list[int]]]:
    """(text, ids) per prompt: a string, a list of strings, a list of token ids, or a list of those."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append((p, state.tok.encode(p)))
        else:
            if any(not 0 <= t < state.tok.vocab_size for t in p):
                raise APIError(400, f"prompt token ids must be in [0, {state.tok.vocab_size})", param="prompt")
            out.append((state.tok.decode(p), list(p)))
    return out


def sampling_params(state: ServingState, body: P.SamplingFields, n_prompt: int, max_tokens: int | None,
                    stop_ids: tuple[int, ...]) -> SamplingParams:
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if top_p == 0:  # OpenAI allows 0: only the most likely token
        temperature, top_p = 0.0, 1.0
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if max_tokens is None:  # as much as the context leaves
        max_tokens = max(state.engine.max_seq_len - n_prompt, 1)
    return SamplingParams(
        temperature=temperature, top_p=top_p, top_k=body.top_k or 0, min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0, presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0, max_new_tokens=max_tokens,
        stop=tuple(s for s in stops if s), stop_token_ids=stop_ids, seed=body.seed,
    )


def logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    try:
        return {int(k): v for k, v in bias.items()}
    except ValueError as e:
        raise APIError(400, "logit_bias keys must be token ids", param="logit_bias") from e


async def submit(engine: Engine, gen: GenerationRequest, prompt_param: str = "messages") -> RequestHandle:
    try:
        await run_in_threadpool(engine.prepare, gen)  # JSON grammars compile off the event loop
        return engine.submit(gen)
    except RequestRejected as e:
        param = prompt_param if e.param == "messages" else e.param
        raise APIError(400, str(e), param=param, code=e.code) from e
    except QueueFull as e:
        raise APIError(429, f"the server is busy: {e}", code="queue_full") from e
    except EngineStopped as e:
        raise APIError(503, "the server is not ready or shutting down", code="unavailable") from e


async def collect(handles: list[RequestHandle], request: Request, n: int) -> list[CompletedRequest]:
    """Wait for non-streamed results; if the client disconnects first, cancel the generations."""

    async def watch_disconnect():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for h in handles:
            h.cancel()

    async def fold(handle: RequestHandle) -> CompletedRequest:
        result = CompletedRequest.empty(n)
        async for ev in handle:
            if isinstance(ev, RequestFailed):
                raise APIError(500, ev.message)
            result.add(ev)
        return result

    watcher = asyncio.create_task(watch_disconnect())
    try:
        return list(await asyncio.gather(*(fold(h) for h in handles)))
    finally:
        watcher.cancel()
        for h in handles:
            h.cancel()  # no-op for finished ones; the others were left behind by a failure


# ---- engine -> responses -------------------------------------------------------------------------------------
def usage_body(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def sum_usage(usages: list[Usage]) -> Usage:
    return Usage(sum(u.prompt_tokens for u in usages), sum(u.completion_tokens for u in usages),
                 sum(u.cached_tokens for u in usages))


def chat_logprobs(state: ServingState, lps: list[TokenLogprob]) -> dict:
    tok = state.tok

    def entry(token: int, logprob: float) -> dict:
        return {"token": tok.decode([token]), "logprob": logprob, "bytes": list(tok.token_bytes(token))}

    return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps], "refusal": None}


def chat_completion_body(state: ServingState, head: dict, result: CompletedRequest, want_lps: bool) -> dict:
    choices = [{
        "index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
        "logprobs": chat_logprobs(state, c.logprobs or []) if want_lps else None, "finish_reason": c.finish_reason,
    } for i, c in enumerate(result.choices)]
    return {**head, "object": "chat.completion", "choices": choices, "usage": usage_body(result.usage)}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def sse_response(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def chat_stream(state: ServingState, handle: RequestHandle, head: dict, n: int, include_usage: bool,
                      want_lps: bool):
    def chunk(choices: list[dict], usage: Usage | None = None) -> str:
        body = {**head, "object": "chat.completion.chunk", "choices": choices}
        if include_usage:
            body["usage"] = usage_body(usage) if usage else None
        return sse(body)

    try:
        for i in range(n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for ev in handle:
            if isinstance(ev, ChoiceDelta) and (ev.text or ev.logprobs or ev.finish_reason):
                yield chunk([{
                    "index": ev.index, "delta": {"content": ev.text} if ev.text else {},
                    "logprobs": chat_logprobs(state, ev.logprobs) if want_lps and ev.logprobs else None,
                    "finish_reason": ev.finish_reason,
                }])
            elif isinstance(ev, RequestFailed):
                yield sse(APIError(500, ev.message).body())
                return
            elif isinstance(ev, RequestFinished) and include_usage:
                yield chunk([], ev.usage)
        yield sse("[DONE]")
    finally:
        handle.cancel()  # a no-op when finished; otherwise the client went away mid-stream


class _TextLogprobs:
    """The legacy completions logprobs format, built token by token (text_offset counts characters)."""

    def __init__(self, state: ServingState, offset: int = 0):
        self.tok = state.tok
        self.decoder = IncrementalDecoder(self.tok)
        self.offset = offset
        self.body = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, token: int, lp: TokenLogprob | None) -> None:
        b = self.body
        b["tokens"].append(self.tok.decode([token]))
        b["token_logprobs"].append(None if lp is None else lp.logprob)
        b["top_logprobs"].append(None if lp is None else {self.tok.decode([t]): v for t, v in lp.top})
        b["text_offset"].append(self.offset)
        self.offset += len(self.decoder.feed(token))

    def take(self) -> dict:
        """The entries added since the last take (for streaming)."""
        out = self.body
        self.body = {k: [] for k in out}
        return out


def completion_body(state: ServingState, head: dict, prompts, results: list[CompletedRequest],
                    body: P.CompletionRequest) -> dict:
    choices = []
    for p, ((text, ids), result) in enumerate(zip(prompts, results)):
        for j, c in enumerate(result.choices):
            lps = None
            if body.logprobs is not None:
                builder = _TextLogprobs(state)
                if body.echo:
                    for token, lp in zip(ids, result.prompt_logprobs or [None] * len(ids)):
                        builder.add(token, lp)
                for token, lp in zip(c.token_ids, c.logprobs or []):
                    builder.add(token, lp)
                lps = builder.body
            choices.append({"index": p * body.n + j, "text": (text if body.echo else "") + c.text,
                            "logprobs": lps, "finish_reason": c.finish_reason})
    usage = sum_usage([r.usage for r in results])
    return {**head, "object": "text_completion", "choices": choices, "usage": usage_body(usage)}


async def merge(handles: list[RequestHandle]):
    """Events of several requests as (request index, event), in arrival order."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, h: RequestHandle):
        async for ev in h:
            await q.put((i, ev))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    open_ = len(handles)
    try:
        while open_:
            i, ev = await q.get()
            yield i, ev
            if isinstance(ev, (RequestFinished, RequestFailed)):
                open_ -= 1
    finally:
        for t in tasks:
            t.cancel()
        for h in handles:
            h.cancel()


async def completion_stream(state: ServingState, handles, prompts, head: dict, body: P.CompletionRequest,
                            include_usage: bool):
    n = body.n
    builders = {}
    usages = []

    def chunk(choices: list[dict], usage: Usage | None = None) -> str:
        out = {**head, "object": "text_completion", "choices": choices}
        if include_usage:
            out["usage"] = usage_body(usage) if usage else None
        return sse(out)

    def builder(index: int, prompt_text: str) -> _TextLogprobs:
        if index not in builders:
            builders[index] = _TextLogprobs(state, len(prompt_text) if body.echo else 0)
        return builders[index]

    try:
        if body.echo and (body.logprobs is None):
            for p, (text, _) in enumerate(prompts):
                for j in range(n):
                    yield chunk([{"index": p * n + j, "text": text, "logprobs": None, "finish_reason": None}])
        async for p, ev in merge(handles):
            text, ids = prompts[p]
            if isinstance(ev, PromptLogprobs):  # echo with logprobs: the prompt comes first, scored
                for j in range(n):
                    b = _TextLogprobs(state)
                    for token, lp in zip(ids, ev.tokens):
                        b.add(token, lp)
                    yield chunk([{"index": p * n + j, "text": text, "logprobs": b.body, "finish_reason": None}])
            elif isinstance(ev, ChoiceDelta) and (ev.text or ev.token_ids or ev.finish_reason):
                lps = None
                if body.logprobs is not None:
                    b = builder(p * n + ev.index, text)
                    for token, lp in zip(ev.token_ids, ev.logprobs or []):
                        b.add(token, lp)
                    lps = b.take()
                yield chunk([{"index": p * n + ev.index, "text": ev.text, "logprobs": lps,
                              "finish_reason": ev.finish_reason}])
            elif isinstance(ev, RequestFailed):
                yield sse(APIError(500, ev.message).body())
                return
            elif isinstance(ev, RequestFinished):
                usages.append(ev.usage)
        if include_usage:
            yield chunk([], sum_usage(usages))
        yield sse("[DONE]")
    finally:
        for h in handles:
            h.cancel()
