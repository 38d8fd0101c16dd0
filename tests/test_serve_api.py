"""`omnigpt serve`'s API through the official `openai` client (sync, async, streaming) on a real loopback socket:
every request parameter, exact usage, and the bad inputs that must come back as OpenAI-shaped errors without
disturbing anyone else."""

import asyncio
import base64
import json
import socket
import time

import httpx
import jsonschema
import openai
import pytest
from conftest import fail_nth_decode, image_data_url
import torch
from pydantic import BaseModel

from omnigpt.infer.engine import EngineConfig
from omnigpt.serve.app import create_app
from omnigpt.serve.checkpoint import load_for_serving
from omnigpt.serve.testing import ServerThread, make_tiny_checkpoint
from omnigpt.tokenizer.chat import render_chat

KEY = "test-key"
MODEL = "omnigpt-tiny"
ROWS = 8
CONTEXT = 512
NO_EOS = {}  # logit_bias keeping a random model from ending early where a test counts tokens (set below)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    s = load_for_serving(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), max_seq_len=CONTEXT, name=MODEL))
    NO_EOS.update({str(s.tokenizer.im_end_id): -100, str(s.tokenizer.eot_id): -100})
    return s


@pytest.fixture(scope="module")
def server(served):
    app = create_app(served, EngineConfig(cpu_threads=1, max_batch_size=ROWS, max_queue=64, prefix_cache_rows=4), api_key=KEY,
                     model_names=[MODEL, "gpt-4o"], max_body_bytes=1 << 20)
    with ServerThread(app) as srv:
        srv.engine = app.state.serving.engine
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def chat(client, content="hello there", **kw):
    kw.setdefault("max_tokens", 8)
    kw.setdefault("logit_bias", NO_EOS)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# ---- endpoints ---------------------------------------------------------------------------------------------
def test_models_health_and_metrics(client, http):
    assert [m.id for m in client.models.list()] == [MODEL, "gpt-4o"]
    assert client.models.retrieve("gpt-4o").id == "gpt-4o"
    assert http.get("/health").json() == {"status": "ok", "model": MODEL}
    chat(client)
    text = http.get("/metrics").text
    for name in ("omnigpt_requests_total", "omnigpt_generation_tokens_total", "omnigpt_queue_depth",
                 "omnigpt_running_sequences", "omnigpt_time_to_first_token_seconds_bucket", "omnigpt_prompt_tokens_total"):
        assert f"# TYPE {name.removesuffix('_bucket')}" in text
    assert 'omnigpt_http_requests_total{route="/v1/chat/completions",status="200"}' in text


def test_the_seed_client_code_works_unchanged(client, served):
    """The shape of the seeds' GPT-4o call: model name, system + user messages with text parts."""
    r = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "system", "content": "You are helpful."},
                  {"role": "user", "content": [{"type": "text", "text": "Describe this."}]}],
        max_tokens=5)
    assert r.object == "chat.completion" and r.model == "gpt-4o"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.role == "assistant"


def test_usage_counts_are_exact(client, served):
    tok = served.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello!"}, {"role": "developer", "content": "json only"},
                {"role": "user", "content": [{"type": "text", "text": "and "}, {"type": "text", "text": "you?"}]}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7, temperature=0, logit_bias=NO_EOS)
    plain = [{**m, "role": "system" if m["role"] == "developer" else m["role"],
              "content": m["content"] if isinstance(m["content"], str) else "and you?"} for m in messages]
    prompt, _ = render_chat(tok, plain, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == 7 and r.usage.total_tokens == len(prompt) + 7
    assert r.choices[0].finish_reason == "length"
    eos = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7,
                                         logit_bias={str(tok.im_end_id): 100})
    assert eos.choices[0].finish_reason == "stop" and eos.choices[0].message.content == ""
    assert eos.usage.completion_tokens == 1


def test_streaming_matches_non_streaming(client):
    full = chat(client, max_tokens=20, temperature=0)
    stream = chat(client, max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert full.choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])
    assert all(c.usage is None for c in chat(client, max_tokens=3, stream=True))  # usage only when asked


def test_n_choices_with_seed(client):
    a = chat(client, n=3, seed=7, temperature=1.0, max_tokens=10)
    b = chat(client, n=3, seed=7, temperature=1.0, max_tokens=10)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens == 30
    streamed = {}
    for chunk in chat(client, n=2, seed=7, temperature=1.0, max_tokens=10, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert streamed == {0: a.choices[0].message.content, 1: a.choices[1].message.content}


def test_temperature_top_p_and_seed(client):
    same = {chat(client, temperature=0.9, top_p=0.8, seed=3, max_tokens=12).choices[0].message.content for _ in range(2)}
    assert len(same) == 1
    seeds = {chat(client, temperature=1.5, seed=s, max_tokens=12).choices[0].message.content for s in range(4)}
    assert len(seeds) > 1
    greedy = {chat(client, temperature=0, max_tokens=12).choices[0].message.content for _ in range(2)}
    assert len(greedy) == 1 and greedy == {chat(client, top_p=0, max_tokens=12).choices[0].message.content}


def test_max_tokens_and_max_completion_tokens(client):
    assert chat(client, max_tokens=4).usage.completion_tokens == 4
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_completion_tokens=6,
                                       logit_bias=NO_EOS)
    assert r.usage.completion_tokens == 6


def test_stop_strings(client):
    text = chat(client, temperature=0, max_tokens=40).choices[0].message.content
    stop = text[10:13]
    for stops in (stop, [stop, "zzzz-never"]):
        r = chat(client, temperature=0, max_tokens=40, stop=stops)
        assert r.choices[0].message.content == text[: text.index(stop)]
        assert r.choices[0].finish_reason == "stop"


def test_presence_and_frequency_penalties(client):
    plain = chat(client, temperature=0, max_tokens=40).choices[0].message.content
    penalised = chat(client, temperature=0, max_tokens=40, presence_penalty=2, frequency_penalty=2).choices[0].message.content
    assert penalised != plain


def test_logprobs(client, served):
    r = chat(client, logprobs=True, top_logprobs=3, max_tokens=6, temperature=0)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob)  # greedy picks the top token
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token
    assert "".join(bytes(b for t in content for b in t.bytes).decode("utf-8", "replace")) == r.choices[0].message.content
    assert chat(client, max_tokens=2).choices[0].logprobs is None
    streamed = [c.choices[0].logprobs for c in chat(client, logprobs=True, max_tokens=3, stream=True)
                if c.choices and c.choices[0].logprobs]
    assert sum(len(lp.content) for lp in streamed) == 3


RECORD = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "count": {"type": "integer"},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}, "ok": {"type": "boolean"}},
    "required": ["name", "count", "tags", "ok"], "additionalProperties": False,
}


def test_response_format_json_object_and_schema(client):
    for seed in range(3):
        r = chat(client, "give me json", max_tokens=60, temperature=1.0, seed=seed, response_format={"type": "json_object"})
        assert isinstance(json.loads(r.choices[0].message.content), dict)
        r = chat(client, "give me json", max_tokens=60, temperature=1.0, seed=seed,
                 response_format={"type": "json_schema", "json_schema": {"name": "record", "schema": RECORD, "strict": True}})
        jsonschema.validate(json.loads(r.choices[0].message.content), RECORD)
    chunks = chat(client, max_tokens=40, seed=1, stream=True, response_format={"type": "json_object"})
    assert isinstance(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), dict)


class Pet(BaseModel):
    name: str
    legs: int
    cute: bool


def test_pydantic_structured_output_parse(client):
    r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "a pet"}],
                                      response_format=Pet, max_tokens=60, seed=0)
    assert isinstance(r.choices[0].message.parsed, Pet)


def test_async_client_concurrent_requests_do_not_mix(server, client):
    solo = [chat(client, f"prompt number {i}", temperature=0, max_tokens=10).choices[0].message.content for i in range(6)]

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)

        async def plain(i):
            r = await aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"prompt number {i}"}],
                                                      temperature=0, max_tokens=10, logit_bias=NO_EOS)
            return r.choices[0].message.content

        async def streamed(i):
            s = await aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"prompt number {i}"}],
                                                      temperature=0, max_tokens=10, stream=True, logit_bias=NO_EOS)
            return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])

        async def noisy():  # different settings in the same batch must not leak into the others
            await aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "noise"}], max_tokens=30,
                                                  presence_penalty=2, logit_bias={"5": 50}, n=2, temperature=1.5,
                                                  response_format={"type": "json_object"})

        results = await asyncio.gather(*[plain(i) for i in range(6)], *[streamed(i) for i in range(6)], noisy(), noisy())
        await aclient.close()
        return results[:12]

    results = asyncio.run(main())
    assert results == solo + solo


# ---- completions (log-likelihood evaluation) ------------------------------------------------------------------
@torch.no_grad()
def test_completions_echo_scores_the_prompt(client, served):
    tok = served.tokenizer
    prompt = "the quick brown fox jumps"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    c = r.choices[0]
    ids = tok.encode(prompt)
    assert c.text == prompt and r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    lp = served.model(torch.tensor([ids])).logits[0, :, : tok.vocab_size].log_softmax(-1)
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert c.logprobs.token_logprobs[i] == pytest.approx(lp[i - 1, ids[i]].item(), abs=1e-4)
        assert len(c.logprobs.top_logprobs[i]) <= 2
    assert c.logprobs.tokens == [tok.decode([i]) for i in ids]
    assert c.logprobs.text_offset == [len(tok.decode(ids[:i])) for i in range(len(ids))]


def test_completions_prompts_as_lists_and_token_ids(client, served):
    tok = served.tokenizer
    r = client.completions.create(model=MODEL, prompt=["hello", "world"], max_tokens=3, n=2, temperature=0,
                                  logit_bias=NO_EOS)
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and r.usage.completion_tokens == 12
    by_ids = client.completions.create(model=MODEL, prompt=tok.encode("hello"), max_tokens=3, temperature=0,
                                       logit_bias=NO_EOS)
    assert by_ids.choices[0].text == r.choices[0].text
    both = client.completions.create(model=MODEL, prompt=[tok.encode("hello"), tok.encode("world")], max_tokens=3,
                                     temperature=0, logit_bias=NO_EOS)
    assert [c.text for c in both.choices] == [r.choices[0].text, r.choices[2].text]


def test_completions_stream_with_echo_and_logprobs(client):
    full = client.completions.create(model=MODEL, prompt="hello world", max_tokens=5, temperature=0, echo=True, logprobs=1)
    chunks = list(client.completions.create(model=MODEL, prompt="hello world", max_tokens=5, temperature=0, echo=True,
                                            logprobs=1, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == full.choices[0].logprobs.tokens
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


# ---- errors ------------------------------------------------------------------------------------------------
def test_api_key_required(server):
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "x", max_retries=0,
                            default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200  # the page and health stay open
    assert httpx.get(server.url + "/").status_code == 200


def test_invalid_json_and_wrong_types_are_400(http):
    r = http.post("/v1/chat/completions", content=b'{"model": "x", "messages": [', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"
    r = http.post("/v1/chat/completions", content=b"not json at all")
    assert r.status_code == 400 and error_of(r)["type"] == "invalid_request_error"
    cases = [
        ({"model": MODEL, "messages": "hi"}, "messages"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": "two"}, "n"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, "response_format.type"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ]
    for body, param in cases:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, (body, r.text)
        err = error_of(r)
        assert err["param"] is not None and err["param"].startswith(param), (body, err)


def test_unknown_role_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}])
    assert e.value.body["param"] == "messages[0].role" and "wizard" in e.value.body["message"]


def test_images_are_validated_then_refused_without_vision(client):
    def send(url):
        return client.chat.completions.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": url}}]}])

    cases = [
        ("data:image/png;base64,###notbase64###", "invalid_image", "base64"),
        ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "invalid_image", "readable image"),
        ("https://example.com/cat.png", "invalid_image", "data URL"),
        ("data:text/plain;base64,aGVsbG8=", "invalid_image", "data URL"),
        (image_data_url(), "image_input_not_supported", "vision"),
    ]
    for url, code, words in cases:
        with pytest.raises(openai.BadRequestError) as e:
            send(url)
        assert e.value.body["code"] == code and words in e.value.body["message"]
        assert e.value.body["param"] == "messages[0].content[1].image_url.url"


def test_prompt_longer_than_the_context(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "word " * (CONTEXT + 10), max_tokens=None)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "hi", max_tokens=CONTEXT)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="word " * (CONTEXT + 10), max_tokens=1)
    assert e.value.body["param"] == "prompt"


def test_n_too_large(client):
    for n, param in ((ROWS + 1, "n"), (1000, "n")):
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, n=n)
        assert e.value.body["param"] == param


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")


def test_unknown_paths_and_methods(http):
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and error_of(r)["type"] == "not_found_error"
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and error_of(r)


def test_body_too_large_is_413(http):
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    r = http.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit applies to what arrives
        for _ in range(40):
            yield b"x" * 65536

    r = http.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_queue_full_is_429(served):
    app = create_app(served, EngineConfig(cpu_threads=1, max_batch_size=1, max_queue=1, prefix_cache_rows=0))
    with ServerThread(app) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        running = chat(c, max_tokens=400, stream=True)
        next(iter(running))
        with httpx.Client(base_url=srv.url, timeout=30) as h:
            with h.stream("POST", "/v1/chat/completions", json={"model": MODEL, "max_tokens": 3, "stream": True,
                                                                "messages": [{"role": "user", "content": "wait"}]}):
                with pytest.raises(openai.RateLimitError) as e:
                    chat(c, max_tokens=2)
        assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
        running.close()


def wait_until(condition, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_client_disconnect_mid_stream_frees_the_rows(server, http):
    engine = server.engine
    cancelled = engine.stats.requests_cancelled
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as h:
        with h.stream("POST", "/v1/chat/completions", json={
                "model": MODEL, "stream": True, "max_tokens": 450, "n": 2, "logit_bias": NO_EOS,  # no early end
                "messages": [{"role": "user", "content": "tell me a long story"}]}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data:")
            assert wait_until(lambda: engine.rows_in_use() >= 2)
    # the connection is closed: the engine must notice and give the rows back long before 450 tokens
    assert wait_until(lambda: engine.stats.requests_cancelled > cancelled and engine.rows_in_use() == 0)
    assert engine.stats.requests_cancelled == cancelled + 1


def test_non_streaming_client_disconnect_is_cancelled_too(server):
    engine = server.engine
    cancelled = engine.stats.requests_cancelled
    body = json.dumps({"model": MODEL, "max_tokens": 480, "n": 2, "messages": [{"role": "user", "content": "x"}],
                       "logit_bias": NO_EOS}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:  # a client that hangs up while it waits
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        assert wait_until(lambda: engine.rows_in_use() >= 2)
    assert wait_until(lambda: engine.stats.requests_cancelled > cancelled and engine.rows_in_use() == 0)


def test_bad_requests_do_not_stall_a_running_stream(server, client, http):
    stream = chat(client, max_tokens=200, stream=True, temperature=0)
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    t0 = time.time()
    for _ in range(20):
        assert http.post("/v1/chat/completions", content=b"{{{", headers={"Content-Type": "application/json"}).status_code == 400
        assert http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "x"}]}).status_code == 400
    assert time.time() - t0 < 10
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == chat(client, max_tokens=200, temperature=0).choices[0].message.content[len(first.choices[0].delta.content or ""):]


def test_an_error_during_generation_is_an_sse_error_event(server, client, monkeypatch):
    fail_nth_decode(server.engine, monkeypatch, 3, "injected fault")
    with chat(client, max_tokens=50, stream=True) as stream:
        with pytest.raises(openai.APIError, match="injected fault"):
            for _ in stream:
                pass
    monkeypatch.undo()
    fail_nth_decode(server.engine, monkeypatch, 2, "injected fault")
    with pytest.raises(openai.InternalServerError):  # the same fault in a non-streamed request: a 500
        chat(client, max_tokens=50)
    monkeypatch.undo()
    assert chat(client, max_tokens=3).usage.completion_tokens == 3  # the server carries on
