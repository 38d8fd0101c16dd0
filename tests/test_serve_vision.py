"""Serving a vision-language checkpoint: `image_url` parts through the official `openai` client on a real loopback
socket, for both fusion modes (inline and cross-attention), answered exactly as generate_vlm answers the same
conversation; images that are corrupt, too large, of an unsupported format or too many are 400s naming the part;
`omnigpt chat` sends local files; the web page sends an attached image and streams the answer."""

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import torch
from conftest import image_data_url
from PIL import Image

from omnigpt import cli
from omnigpt.infer.engine import Engine, EngineConfig, GenerationRequest, RequestRejected
from omnigpt.infer.sampling import SamplingParams
from omnigpt.model.multimodal import generate_vlm, load_vlm
from omnigpt.model.vision import preprocess
from omnigpt.serve.app import create_app
from omnigpt.serve.chat_client import run_chat
from omnigpt.serve.checkpoint import load_for_serving
from omnigpt.serve.images import ImageLimits
from omnigpt.serve.testing import ServerThread, make_tiny_vlm_checkpoint
from omnigpt.tokenizer.chat import render_chat

MODEL = "tiny-vlm"
SYSTEM = "you are a brief and careful assistant who looks at the image and says what is in it"  # > 16 tokens

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Vision:
    """A served VLM, a client for it, and a separately loaded copy of the same weights for reference answers."""

    def __init__(self, ckpt, srv, client):
        self.served, self.engine, self.client = srv.served, srv.engine, client
        self.tok, self.cfg = self.served.tokenizer, self.served.vlm.cfg
        self.ref = load_vlm(ckpt).eval()
        self.no_eos = {str(self.tok.im_end_id): -100, str(self.tok.eot_id): -100}  # run to max_tokens

    def chat(self, messages, **kw):
        kw.setdefault("max_tokens", 10)
        kw.setdefault("logit_bias", self.no_eos)
        return self.client.chat.completions.create(model=MODEL, messages=messages, **kw)

    def prompt(self, messages) -> list[int]:
        return render_chat(self.tok, messages, add_generation_prompt=True, image_tokens=self.cfg.image_tokens)[0]

    def greedy(self, messages, images, max_new: int):
        """generate_vlm's greedy answer (text tokens only, as the API samples, and no end: logit_bias above)."""
        pixels = preprocess(images, self.cfg.vision) if images else None
        return generate_vlm(self.ref, [self.prompt(messages)], pixels, SamplingParams(temperature=0, max_new_tokens=max_new),
                            decode=self.tok.decode, vocab_size=self.tok.n_text)[0]

    def check_first_logprobs(self, response, messages, images) -> list[float]:
        """The response's first top_logprobs are the reference model's (the most sensitive parity check)."""
        top = response.choices[0].logprobs.content[0].top_logprobs
        pixels = preprocess(images, self.cfg.vision) if images else None
        with torch.no_grad():
            logits = self.ref(torch.tensor([self.prompt(messages)]), pixels_NCHW=pixels).logits[0, -1]
        values, tokens = logits[: self.tok.vocab_size].float().log_softmax(-1).topk(len(top))
        assert [t.bytes for t in top] == [list(self.tok.token_bytes(i)) for i in tokens.tolist()]
        assert [t.logprob for t in top] == pytest.approx(values.tolist(), abs=1e-4)
        return [t.logprob for t in top]


def serve(ckpt, **app_kw) -> ServerThread:
    """A server for ckpt (prefill in chunks of 10 tokens: an image of the first test is split across two)."""
    config = EngineConfig(cpu_threads=1, max_batch_size=4, prefix_cache_rows=2, prefill_chunk_tokens=10)
    app = create_app(load_for_serving(ckpt), config, model_names=[MODEL], **app_kw)
    srv = ServerThread(app)
    srv.served, srv.engine = app.state.serving.served, app.state.serving.engine
    return srv


def openai_client(srv: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module", params=["inline", "cross"])
def vision(request, tmp_path_factory):
    ckpt = make_tiny_vlm_checkpoint(tmp_path_factory.mktemp(request.param), fusion=request.param, max_seq_len=256)
    with serve(ckpt) as srv, openai_client(srv) as client:
        yield Vision(ckpt, srv, client)


def encoded(im: Image.Image, fmt: str) -> tuple[str, Image.Image]:
    """(data URL of im in fmt, the image that decoding those bytes gives: what the server sees)."""
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    data = buf.getvalue()
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(data).decode(), Image.open(io.BytesIO(data))


def gradient(w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], -1).astype(np.uint8))


def picture(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def text(s: str) -> dict:
    return {"type": "text", "text": s}


# ---- answers -----------------------------------------------------------------------------------------------
def test_images_across_turns_answered_as_generate_vlm(vision):
    """Three images of three formats and sizes, one in an earlier turn and two in the last: the greedy answer is
    generate_vlm's, token for token, and prompt_tokens counts every image's tokens."""
    (u1, i1), (u2, i2), (u3, i3) = (encoded(gradient(40, 24), "PNG"), encoded(Image.new("RGB", (20, 50), (20, 40, 220)), "JPEG"),
                                    encoded(gradient(64, 64).convert("P"), "GIF"))
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": [text("what is this?"), picture(u1)]},
                {"role": "assistant", "content": "a gradient"},
                {"role": "user", "content": [text("and these two?"), picture(u2), picture(u3)]}]
    r = vision.chat(messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    ref = vision.greedy(messages, [i1, i2, i3], 12)
    vision.check_first_logprobs(r, messages, [i1, i2, i3])
    assert [lp.bytes for lp in r.choices[0].logprobs.content] == [list(vision.tok.token_bytes(t)) for t in ref.tokens]
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == "length"
    text_only = [{**m, "content": m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]} for m in messages]
    per_image = vision.cfg.image_tokens + 2  # <|image_start|>, the placeholders, <|image_end|>
    assert r.usage.prompt_tokens == len(vision.prompt(messages)) == len(vision.prompt(text_only)) + 3 * per_image
    assert r.usage.completion_tokens == 12


def test_streamed_image_answers_with_n_seed_and_stop(vision):
    url, _ = encoded(gradient(32, 32), "PNG")
    messages = [{"role": "user", "content": [text("describe the picture"), picture(url)]}]
    kw = dict(max_tokens=8, n=2, temperature=0.9, seed=11)
    full = vision.chat(messages, **kw)
    stream = vision.chat(messages, stream=True, stream_options={"include_usage": True}, **kw)
    texts, usage = ["", ""], None
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
        usage = chunk.usage or usage
    assert texts == [c.message.content for c in full.choices]  # the same seeded samples, streamed
    assert usage.prompt_tokens == full.usage.prompt_tokens and usage.completion_tokens == 16

    greedy = vision.chat(messages, max_tokens=10, temperature=0).choices[0].message.content
    ascii_at = [i for i in range(1, len(greedy) - 1) if greedy[i: i + 2].isascii() and greedy[i: i + 2].isalpha()]
    if ascii_at:  # a stop string taken from the middle of the answer cuts it there
        stop = greedy[ascii_at[0]: ascii_at[0] + 2]
        cut = vision.chat(messages, max_tokens=10, temperature=0, stop=[stop]).choices[0]
        assert cut.message.content == greedy[: greedy.index(stop)] and cut.finish_reason == "stop"


def test_the_image_decides_the_logprobs_and_never_leaks_through_the_prefix_cache(vision):
    """Same text, different images: the first token's distribution is the reference model's for each image,
    although the second request reuses the first one's KV up to its image (and not after)."""
    tok = vision.tok
    first = {}
    for name, color in (("red", (230, 20, 20)), ("blue", (20, 20, 230)), ("red again", (230, 20, 20))):
        url, im = encoded(Image.new("RGB", (32, 32), color), "PNG")
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": [text("which colour?"), picture(url)]}]
        r = vision.chat(messages, max_tokens=1, temperature=0, logprobs=True, top_logprobs=5)
        first[name] = vision.check_first_logprobs(r, messages, [im])
        if name != "red":  # the system prompt and the user turn up to the image came from the prefix cache
            assert 0 < r.usage.prompt_tokens_details.cached_tokens <= vision.prompt(messages).index(tok.image_id)
    assert first["red"] != pytest.approx(first["blue"], abs=1e-3)
    assert first["red"] == pytest.approx(first["red again"], abs=1e-5)


def test_requests_with_different_images_batched_together(vision, monkeypatch):
    """Three requests (two images, none, one) admitted in the same step: their prefill chunks share a forward
    (rows of different lengths, images at different columns, padded media), and so do their decode steps. The
    third one's first chunk ends on an image placeholder, in a row shorter than the others."""
    engine = vision.engine
    (u1, i1), (u2, i2), (u3, i3) = (encoded(gradient(30, 30), "PNG"), encoded(Image.new("RGB", (8, 8), (9, 200, 9)), "PNG"),
                                    encoded(gradient(16, 40), "JPEG"))
    conversations = [
        ([{"role": "user", "content": [text("compare"), picture(u1), text("with"), picture(u2)]}], [i1, i2]),
        ([{"role": "user", "content": "no picture, just words"}], []),
        ([{"role": "system", "content": "short"}, {"role": "user", "content": [text("and this?"), picture(u3)]}], [i3]),
    ]
    a, b, c = (vision.prompt(m) for m, _ in conversations)
    third = c.index(vision.tok.image_id) + 2  # the third prompt's first chunk: up to its second image token
    assert third < min(len(c), len(a))
    engine.prefix.clear()  # (the engine is idle) so that every prompt is read from its first token
    monkeypatch.setattr(engine.config, "prefill_chunk_tokens", len(a) + len(b) + third)
    admit = engine._admit
    monkeypatch.setattr(engine, "_admit", lambda: admit() if engine._active or len(engine._waiting) == 3 else None)
    rows, forward = [], engine.images.forward  # rows of the forwards that carried images
    monkeypatch.setattr(engine.images, "forward", lambda model, tokens, *a, **k: rows.append(len(tokens)) or
                        forward(model, tokens, *a, **k))
    with ThreadPoolExecutor(3) as pool:
        futures = []
        for messages, _ in conversations:  # queued in this order
            futures.append(pool.submit(vision.chat, messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=5))
            deadline = time.time() + 30
            while len(engine._waiting) < len(futures) and not engine._active and time.time() < deadline:
                time.sleep(0.005)
        answers = [f.result() for f in futures]
    for (messages, images), r in zip(conversations, answers):
        assert r.choices[0].message.content == vision.greedy(messages, images, 6).text
        vision.check_first_logprobs(r, messages, images)
    assert max(rows) == 3


def test_text_only_requests_to_a_vision_model(vision):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello there"}]
    r = vision.chat(messages, max_tokens=8, temperature=0)
    ref = vision.greedy(messages, [], 8)
    assert r.choices[0].message.content == ref.text and r.usage.prompt_tokens == len(vision.prompt(messages))


# ---- refusals ----------------------------------------------------------------------------------------------
LIMITS = ImageLimits(max_bytes=40_000, max_pixels=200_000, max_images=3)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An inline VLM with small image limits (the web page test uses it too)."""
    with serve(make_tiny_vlm_checkpoint(tmp_path_factory.mktemp("limits")), image_limits=LIMITS) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai_client(server) as c:
        yield c


@pytest.fixture
def encoded_images(server, monkeypatch) -> list[int]:
    """Images per request that reached the model's vision encoder, in order."""
    seen, real = [], server.engine.images.encode

    def spy(prompt, pixels):
        seen.append(len(pixels))
        return real(prompt, pixels)

    monkeypatch.setattr(server.engine.images, "encode", spy)
    return seen


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels in a few dozen bytes: a decompression bomb's header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def b64_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def test_bad_images_are_400s_naming_the_part(client):
    good = image_data_url((16, 16))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    noisy_png = io.BytesIO()
    noise.save(noisy_png, format="PNG")
    small_noise = io.BytesIO()
    noise.resize((64, 64)).save(small_noise, format="PNG")
    cases = [
        (b64_url(small_noise.getvalue()[: len(small_noise.getvalue()) // 2]), "corrupt or truncated"),
        (b64_url(b"GIF89a but not really a gif"), "unsupported or unreadable image"),
        (b64_url(b"just some text"), "unsupported or unreadable image"),
        (image_data_url((16, 16), fmt="BMP"), "unsupported or unreadable image"),  # Pillow reads BMP; we do not
        (image_data_url((16, 16), fmt="TIFF"), "unsupported or unreadable image"),
        (b64_url(png_header_only(100_000, 100_000)), "too large"),  # 10^10 pixels in 70 bytes
        (image_data_url((500, 500)), "too large: 500x500 pixels"),  # over this server's 200,000
        (b64_url(noisy_png.getvalue()), "larger than this server's limit of 40000 bytes"),
        ("data:image/png;base64,@@@@", "base64"),
        ("https://example.com/cat.png", "not fetched by this server"),
        ("/home/me/cat.png", "expected a data URL"),
    ]
    param = "messages[1].content[2].image_url.url"
    for url, words in cases:
        messages = [{"role": "system", "content": "hi"}, {"role": "user", "content": [text("look"), picture(good), picture(url)]}]
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, stream=stream)
            body = e.value.body
            assert body["param"] == param and body["code"] == "invalid_image", (words, body)
            assert body["message"].startswith(param + ": ") and words in body["message"], (words, body)

    with pytest.raises(openai.BadRequestError) as e:  # one image more than this server takes
        client.chat.completions.create(model=MODEL, max_tokens=3, messages=[
            {"role": "user", "content": [text("four?")] + [picture(good)] * 4}])
    assert e.value.body["param"] == "messages[0].content[4].image_url.url" and e.value.body["code"] == "too_many_images"
    ok = client.chat.completions.create(model=MODEL, max_tokens=3, messages=[
        {"role": "user", "content": [text("three")] + [picture(good)] * 3}])
    assert ok.choices[0].finish_reason in ("stop", "length")  # the server is unharmed


def test_an_image_prompt_longer_than_the_context_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:  # 3 images of 6 tokens fit; a long text after them does not
        client.chat.completions.create(model=MODEL, max_tokens=3, messages=[
            {"role": "user", "content": [picture(image_data_url((8, 8)))] * 3 + [text("the lazy dog " * 200)]}])
    assert e.value.body["code"] == "context_length_exceeded"


def test_a_text_only_engine_refuses_images(server):
    """An engine given no VLM (here: around a VLM's language model alone). Over HTTP, with a text-only checkpoint:
    test_serve_api's test_images_are_validated_then_refused_without_vision."""
    engine = Engine(server.served.model, server.served.tokenizer, EngineConfig(max_batch_size=1))
    with pytest.raises(RequestRejected) as e:
        engine.prepare(GenerationRequest([1, 2, 3], images=torch.zeros(1, 3, 32, 32)))
    assert e.value.code == "image_input_not_supported"


def test_placeholders_and_images_must_agree(server):
    engine, tok = server.engine, server.engine.tok
    with pytest.raises(RequestRejected, match="placeholders"):  # raw <|image|> ids without an image
        engine.prepare(GenerationRequest([tok.im_start_id, tok.image_id, tok.image_id]))
    with pytest.raises(RequestRejected, match="preprocessed"):
        engine.prepare(GenerationRequest([tok.image_id] * 4, images=torch.zeros(1, 3, 64, 64)))


# ---- clients -----------------------------------------------------------------------------------------------
def test_chat_client_sends_local_image_files(server, tmp_path, encoded_images, capsys):
    red, blue = tmp_path / "red.png", tmp_path / "blue.jpg"
    Image.new("RGB", (24, 24), (220, 20, 20)).save(red)
    Image.new("RGB", (24, 24), (20, 20, 220)).save(blue, format="JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    stdin = io.StringIO(f"what is it?\n/image {blue}\n/image {tmp_path / 'notes.txt'}\n/image {tmp_path / 'nope.png'}\n"
                        "and this one?\nno image now\n")
    stdout = io.StringIO()
    code = run_chat(server.url + "/v1", None, None, max_tokens=4, seed=1, images=[str(red)], stdin=stdin, stdout=stdout)
    out = stdout.getvalue()
    assert code == 0 and "[error]" not in out, out
    assert f"(image attached: {blue}" in out and "notes.txt is not a PNG, JPEG, GIF or WebP image" in out
    assert "cannot read" in out and "nope.png" in out
    assert encoded_images == [1, 2, 2]  # each request carries the conversation's images so far
    # a refused image is reported and dropped; the next message goes without it
    big = tmp_path / "big.png"
    Image.new("RGB", (600, 600), (1, 2, 3)).save(big)
    stdout = io.StringIO()
    run_chat(server.url + "/v1", None, None, max_tokens=2, stdin=io.StringIO(f"/image {big}\nlook\nplain\n"), stdout=stdout)
    out = stdout.getvalue()
    assert "[error] 400" in out and "too large" in out and "(1 attached image(s) dropped)" in out
    assert out.count("[error]") == 1
    # `omnigpt chat --image` reads its files before anything else
    assert cli.main(["chat", "--base-url", server.url + "/v1", "--image", str(tmp_path / "nope.png")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_web_page_sends_an_image_to_a_vision_model(page, tmp_path, encoded_images):
    expect = pytest.importorskip("playwright.sync_api").expect
    gradient(48, 48).save(tmp_path / "shapes.png")
    page.set_input_files("#image", str(tmp_path / "shapes.png"))
    expect(page.locator("#attachment")).to_be_visible()
    page.fill("#max-tokens", "6")
    page.fill("#prompt", "What is in this picture?")
    page.click("#send")
    expect(page.locator(".msg.user img")).to_have_count(1)
    answer = page.locator(".msg.assistant").last
    expect(answer).to_have_attribute("data-done", "true", timeout=30_000)
    expect(page.locator(".msg.error")).to_have_count(0)
    expect(answer.locator(".meta")).to_contain_text(" tokens in ")
    assert encoded_images == [1]


def test_an_mrope_vision_model_is_refused_rather_than_served_wrong(tmp_path):
    """The engine gives image tokens 1-D positions; a model trained with 2-D (M-RoPE) ones is refused by name."""
    ckpt = make_tiny_vlm_checkpoint(tmp_path / "mrope", mrope=True)
    served = load_for_serving(ckpt)
    with pytest.raises(ValueError, match="mrope=True"):
        Engine(served.model, served.tokenizer, EngineConfig(cpu_threads=1), vlm=served.vlm)
