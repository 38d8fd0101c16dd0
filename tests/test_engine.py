"""The serving engine on a tiny random model: continuous batching gives the same tokens as recomputing from
scratch, prefix caching skips shared prompt tokens, cancellation frees rows, admission control, logprobs,
stop strings, penalties, JSON constraints, and failures that stay contained."""

import json
import threading
import time

import jsonschema
import pytest
from conftest import fail_nth_decode
import torch

from omnigpt.infer.engine import (
    ChoiceDelta, Engine, EngineConfig, GenerationRequest, QueueFull, RequestFailed, RequestFinished,
    RequestRejected,
)
from omnigpt.infer.sampling import SamplingParams
from omnigpt.serve.checkpoint import load_for_serving
from omnigpt.serve.testing import make_tiny_checkpoint
from omnigpt.tokenizer.chat import render_chat


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return load_for_serving(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(params=[False, True], ids=["plain-decode", "static-decode"])
def engine(served, request):
    """Every engine test runs twice: with the plain decode step, and with the static-shape step that CUDA graphs
    replay on a GPU (here without capture: the row buckets, parking slot and cache-length buckets are the same)."""
    with Engine(served.model, served.tokenizer, EngineConfig(cpu_threads=1, max_batch_size=4, prefix_cache_rows=4,
                                                             prefill_chunk_tokens=24, decode_graphs=request.param)) as e:
        yield e


def greedy(max_new, **kw):
    return SamplingParams(temperature=0, max_new_tokens=max_new, **kw)


@torch.no_grad()
def reference_greedy(served, prompt, n):
    """Greedy decoding by recomputing the whole sequence each step (no cache), text tokens only."""
    ids = list(prompt)
    for _ in range(n):
        logits = served.model(torch.tensor([ids])).logits[0, -1]
        logits[served.tokenizer.n_text:] = float("-inf")
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def prompts_of(served, k):
    tok = served.tokenizer
    return [tok.encode(" ".join(["the quick brown fox"] * (i + 1)) + f" {i}") for i in range(k)]


def test_continuous_batching_matches_recompute(served, engine):
    """More requests than rows, prompts longer than a prefill chunk, arriving while others decode."""
    prompts = prompts_of(served, 7)
    handles = [engine.submit(GenerationRequest(p, greedy(12))) for p in prompts[:3]]
    time.sleep(0.02)
    handles += [engine.submit(GenerationRequest(p, greedy(12))) for p in prompts[3:]]
    for p, h in zip(prompts, handles):
        r = h.result(timeout=60)
        assert r.choices[0].token_ids == reference_greedy(served, p, 12)
        assert r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens == len(p) and r.usage.completion_tokens == 12


def test_requests_join_and_leave_the_running_batch(served, engine):
    tok = served.tokenizer
    long = engine.submit(GenerationRequest(tok.encode("hello"), greedy(150)))
    events = iter(long.events(timeout=60))
    next(events)  # the long request is decoding
    short = engine.submit(GenerationRequest(tok.encode("world"), greedy(3))).result(timeout=60)
    assert short.choices[0].finish_reason == "length"
    assert not long.done  # the short one joined after the long one started and left before it ended
    rest = [ev for ev in events]
    assert isinstance(rest[-1], RequestFinished) and rest[-1].usage.completion_tokens == 150


def test_prefix_cache_skips_a_shared_system_prompt(served, engine):
    tok = served.tokenizer
    system = {"role": "system", "content": "You are a helpful assistant who answers briefly. " * 6}
    first, _ = render_chat(tok, [system, {"role": "user", "content": "hi there"}], add_generation_prompt=True)
    second, _ = render_chat(tok, [system, {"role": "user", "content": "what is json?"}], add_generation_prompt=True)
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert shared > 40

    before = engine.stats.prefilled_tokens
    r1 = engine.generate(first, greedy(5))
    prefilled_first = engine.stats.prefilled_tokens - before
    r2 = engine.generate(second, greedy(5))
    prefilled_second = engine.stats.prefilled_tokens - before - prefilled_first

    assert r1.usage.cached_tokens == 0 and prefilled_first == len(first)
    assert r2.usage.cached_tokens == shared  # the whole shared prefix came from the cache
    assert prefilled_second == len(second) - shared
    assert r2.choices[0].token_ids == reference_greedy(served, second, 5)  # and the reused KV is right


def test_n_choices_read_the_prompt_once_and_seeds_reproduce(served, engine):
    prompt = served.tokenizer.encode("the lazy dog says")
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=123)
    before = engine.stats.prefilled_tokens
    a = engine.generate(prompt, params, n=3)
    assert engine.stats.prefilled_tokens - before <= len(prompt)  # once for all three (less if cached)
    b = engine.generate(prompt, params, n=3)
    assert [c.token_ids for c in a.choices] == [c.token_ids for c in b.choices]
    assert len({tuple(c.token_ids) for c in a.choices}) > 1  # each choice has its own stream of randomness
    assert a.usage.prompt_tokens == len(prompt) and a.usage.completion_tokens == 24


def test_cancel_frees_the_rows(served, engine):
    h = engine.submit(GenerationRequest(served.tokenizer.encode("hello"), greedy(400), n=2))
    next(iter(h.events(timeout=60)))
    assert engine.rows_in_use() == 2
    h.cancel()
    deadline = time.time() + 10
    while engine.rows_in_use() and time.time() < deadline:
        time.sleep(0.01)
    assert engine.rows_in_use() == 0 and engine.stats.requests_cancelled >= 1
    assert engine.generate(served.tokenizer.encode("again"), greedy(2)).choices[0].finish_reason == "length"


def test_admission_control(served):
    tok = served.tokenizer
    with Engine(served.model, tok, EngineConfig(cpu_threads=1, max_batch_size=1, max_queue=1, max_seq_len=128)) as e:
        running = e.submit(GenerationRequest(tok.encode("a"), greedy(100)))
        next(iter(running.events(timeout=60)))
        waiting = e.submit(GenerationRequest(tok.encode("b"), greedy(2)))
        with pytest.raises(QueueFull):
            e.submit(GenerationRequest(tok.encode("c"), greedy(2)))
        with pytest.raises(RequestRejected, match="context") as too_long:
            e.submit(GenerationRequest(list(range(128)), greedy(1)))
        assert too_long.value.code == "context_length_exceeded"
        with pytest.raises(RequestRejected) as too_many:
            e.submit(GenerationRequest(tok.encode("d"), greedy(1), n=2))
        assert too_many.value.param == "n"
        assert waiting.result(timeout=60).choices[0].finish_reason == "length"
        assert running.result(timeout=60).usage.completion_tokens == 100


def test_kv_budget_is_what_gets_allocated(served):
    cfg = served.model.cfg
    config = EngineConfig(cpu_threads=1, max_batch_size=3, prefix_cache_rows=2, max_seq_len=100)
    e = Engine(served.model, served.tokenizer, config)
    allocated = sum(t.numel() * t.element_size() for t in (e.cache.k, e.cache.v, e.prefix.cache.k, e.prefix.cache.v))
    assert config.kv_cache_bytes(cfg, torch.float32) == allocated
    assert EngineConfig.rows_for_budget(allocated, cfg, torch.float32, 100) == 5


@torch.no_grad()
def test_logprobs_are_the_models(served, engine):
    tok = served.tokenizer
    prompt = tok.encode("quick brown fox jumps over the lazy dog " * 8)
    assert len(prompt) > 2 * engine.config.prefill_chunk_tokens  # prompt logprobs across prefill chunks
    r = engine.generate(prompt, greedy(4), logprobs=3, prompt_logprobs=2)
    ids = prompt + r.choices[0].token_ids
    lp = served.model(torch.tensor([ids])).logits[0, :, : tok.vocab_size].log_softmax(-1)
    for i, info in enumerate(r.choices[0].logprobs):
        pos = len(prompt) - 1 + i
        assert info.token == ids[pos + 1]
        assert info.logprob == pytest.approx(lp[pos, info.token].item(), abs=1e-4)
        assert [t for t, _ in info.top] == lp[pos].topk(3).indices.tolist()
    assert r.prompt_logprobs[0] is None
    for i, info in enumerate(r.prompt_logprobs[1:], start=1):
        assert info.token == prompt[i]
        assert info.logprob == pytest.approx(lp[i - 1, prompt[i]].item(), abs=1e-4)
        assert len(info.top) == 2


def test_echo_only_request_scores_the_prompt(served, engine):
    prompt = served.tokenizer.encode("hello world again")
    r = engine.generate(prompt, greedy(0), prompt_logprobs=0)
    assert r.choices[0].token_ids == [] and r.choices[0].finish_reason == "length"
    assert len(r.prompt_logprobs) == len(prompt)


def test_stop_strings_cut_the_text_and_never_stream_partially(served, engine):
    prompt = served.tokenizer.encode("the fox")
    full = engine.generate(prompt, greedy(40)).choices[0].text
    stop = full[12:15]
    cut = full.index(stop)
    h = engine.submit(GenerationRequest(prompt, greedy(40, stop=(stop, "never appears"))))
    deltas = [ev.text for ev in h.events(timeout=60) if isinstance(ev, ChoiceDelta)]
    assert "".join(deltas) == full[:cut]
    assert all(stop not in d for d in deltas)


def test_stop_token_ends_a_choice(served, engine):
    tok = served.tokenizer
    r = engine.generate(tok.encode("hi"), greedy(20, stop_token_ids=(tok.im_end_id,)),
                        logit_bias={tok.im_end_id: 100.0})
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.text == "" and c.token_ids == []
    assert r.usage.completion_tokens == 1  # the stop token counts as generated, as in OpenAI's usage


def test_penalties_discourage_repeats(served, engine):
    prompt = served.tokenizer.encode("the")
    plain = engine.generate(prompt, greedy(40)).choices[0].token_ids
    penalised = engine.generate(prompt, greedy(40, frequency_penalty=2.0, presence_penalty=2.0)).choices[0].token_ids
    assert len(set(penalised)) > len(set(plain))


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", 3]}, "maxItems": 3},
        "pet": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}},
                                                "required": ["kind"]}]},
    },
    "required": ["name", "age", "score", "ok", "tags", "pet"],
}


@pytest.mark.parametrize("schema", [None, SCHEMA], ids=["json_object", "json_schema"])
def test_json_output_always_parses_and_validates(served, engine, schema):
    prompt = served.tokenizer.encode("answer in json:")
    for seed, budget in [(0, 200), (1, 120), (2, 60), (3, 80)]:
        params = SamplingParams(temperature=1.0, max_new_tokens=budget, seed=seed)
        r = engine.generate(prompt, params, n=3, json_mode=schema is None, json_schema=schema)
        for c in r.choices:
            assert c.finish_reason == "stop", c.text  # the budget closes the document in time
            value = json.loads(c.text)
            assert isinstance(value, dict)
            if schema:
                jsonschema.validate(value, schema)


def test_unsupported_schema_is_rejected(served, engine):
    with pytest.raises(RequestRejected, match="pattern") as e:
        engine.submit(GenerationRequest([1, 2], greedy(5),
                                        json_schema={"type": "object", "properties": {"a": {"type": "string", "pattern": "x"}}}))
    assert e.value.param == "response_format"


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(served, engine, monkeypatch):
    fail_nth_decode(engine, monkeypatch, 2, "injected")
    events = list(engine.submit(GenerationRequest(served.tokenizer.encode("x"), greedy(10))).events(timeout=60))
    assert isinstance(events[-1], RequestFailed) and "injected" in events[-1].message
    assert engine.rows_in_use() == 0
    assert engine.generate(served.tokenizer.encode("y"), greedy(3)).usage.completion_tokens == 3


def test_compiled_decode_falls_back_to_eager_when_it_fails(served):
    config = EngineConfig(cpu_threads=1, max_batch_size=2)
    with Engine(served.model, served.tokenizer, config) as e:
        def broken(*a, **k):
            raise RuntimeError("no compiler")
        e._decode_model = broken
        r = e.generate(served.tokenizer.encode("hi"), greedy(3))
        assert r.usage.completion_tokens == 3 and e._decode_model is e.model


def test_static_decode_falls_back_to_the_plain_step_when_it_fails(served, monkeypatch):
    from omnigpt.infer.cuda_graphs import CudaGraphDecoder

    def broken(*a, **k):
        raise RuntimeError("graph capture failed")
    monkeypatch.setattr(CudaGraphDecoder, "step", broken)
    prompt = served.tokenizer.encode("hi there")
    with Engine(served.model, served.tokenizer, EngineConfig(cpu_threads=1, max_batch_size=4, decode_graphs=True)) as e:
        r = e.generate(prompt, greedy(5))
        assert r.choices[0].token_ids == reference_greedy(served, prompt, 5) and e._row_buckets == []


def test_many_threads_submit_at_once(served, engine):
    tok = served.tokenizer
    prompts = prompts_of(served, 4)
    expected = {i: reference_greedy(served, p, 6) for i, p in enumerate(prompts)}
    results, errors = {}, []

    def client(i):
        try:
            results[i] = engine.generate(prompts[i % 4], greedy(6)).choices[0].token_ids
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert all(results[i] == expected[i % 4] for i in range(16))
    assert tok  # (the tokenizer fixture stays alive for the threads)


@pytest.mark.parametrize("settings", [
    dict(temperature=1e-300), dict(temperature=1.0, repetition_penalty=1e-300), dict(temperature=2.0, top_p=1e-9),
    dict(temperature=1.0, min_p=1.0), dict(temperature=1.0, top_k=10**9), dict(temperature=0, presence_penalty=-2),
    dict(temperature=1.0, top_p=1e-100),  # 0 in float32: every token masked
], ids=str)
def test_extreme_sampling_settings_still_sample(served, engine, settings):
    r = engine.generate(served.tokenizer.encode("hello hello hello"), SamplingParams(max_new_tokens=5, seed=1, **settings))
    assert r.usage.completion_tokens == 5 and len(r.choices[0].token_ids) == 5
