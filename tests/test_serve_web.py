"""The web chat page end to end in headless Chromium (Debian's, driven by Playwright): pick a model, type,
send, watch the answer stream in; attach an image and see the server's refusal explained."""

import base64
import io
import time

import pytest
from PIL import Image

from omnigpt.infer.engine import EngineConfig
from omnigpt.serve.app import create_app
from omnigpt.serve.checkpoint import load_for_serving
from omnigpt.serve.testing import ServerThread, make_tiny_checkpoint

playwright = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    served = load_for_serving(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), name="omnigpt-tiny"))
    app = create_app(served, EngineConfig(cpu_threads=1, max_batch_size=4), model_names=["omnigpt-tiny", "omnigpt-alias"])
    with ServerThread(app) as srv:
        srv.engine = app.state.serving.engine
        yield srv


def test_type_send_and_watch_the_answer_stream(page):
    expect = playwright.expect
    expect(page.locator("#model option")).to_have_count(2)
    page.select_option("#model", "omnigpt-alias")
    page.fill("#system", "You are terse.")
    page.fill("#max-tokens", "24")
    page.fill("#seed", "3")
    page.fill("#prompt", "Hello, who are you?")
    page.click("#send")

    expect(page.locator(".msg.user")).to_have_text("Hello, who are you?")
    answer = page.locator(".msg.assistant").last
    expect(answer).to_have_attribute("data-done", "true", timeout=30_000)
    assert int(answer.get_attribute("data-chunks")) > 1  # it arrived in pieces, as a stream
    assert answer.locator(".text").inner_text().strip()
    expect(answer.locator(".meta")).to_contain_text(" tokens in ")
    expect(page.locator("#send")).to_be_enabled()

    # a second turn keeps the conversation; Enter sends
    page.fill("#prompt", "And then?")
    page.press("#prompt", "Enter")
    expect(page.locator(".msg.assistant")).to_have_count(2)
    expect(page.locator(".msg.assistant").last).to_have_attribute("data-done", "true", timeout=30_000)
    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)


def test_an_attached_image_is_previewed_and_sent(page, tmp_path):
    expect = playwright.expect
    path = tmp_path / "red.png"
    Image.new("RGB", (16, 16), (220, 20, 20)).save(path)
    page.set_input_files("#image", str(path))
    expect(page.locator("#attachment")).to_be_visible()
    src = page.get_attribute("#attachment-preview", "src")
    assert src.startswith("data:image/png;base64,")
    Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()

    page.fill("#prompt", "What is in this picture?")
    page.click("#send")
    expect(page.locator(".msg.user img")).to_have_count(1)
    # the tiny model has no vision: the server's 400 is shown, and the page stays usable
    expect(page.locator(".msg.error")).to_contain_text("cannot read images", timeout=30_000)
    expect(page.locator("#attachment")).to_be_hidden()
    page.fill("#prompt", "then just text")
    page.click("#send")
    expect(page.locator(".msg.assistant").last).to_have_attribute("data-done", "true", timeout=30_000)


def test_stop_button_aborts_the_stream(page, server, monkeypatch):
    expect = playwright.expect
    real_decode = server.engine._decode

    def slow_decode(seqs):  # a slow model, so that the answer is still streaming when Stop is pressed
        time.sleep(0.02)
        return real_decode(seqs)

    monkeypatch.setattr(server.engine, "_decode", slow_decode)
    cancelled = server.engine.stats.requests_cancelled
    page.fill("#max-tokens", "400")
    page.fill("#seed", "5")  # a seeded sample: the random model cannot end early by chance
    page.fill("#prompt", "a long story please")
    page.click("#send")
    answer = page.locator(".msg.assistant").last
    page.wait_for_function("Number(document.querySelector('.msg.assistant').dataset.chunks) > 2", timeout=30_000)
    page.click("#stop")
    expect(answer).to_have_attribute("data-done", "true", timeout=10_000)
    assert answer.get_attribute("data-finish") is None  # stopped before the model finished
    deadline = time.time() + 10  # and the server noticed the closed connection and freed the rows
    while server.engine.stats.requests_cancelled == cancelled and time.time() < deadline:
        time.sleep(0.05)
    assert server.engine.stats.requests_cancelled == cancelled + 1 and server.engine.rows_in_use() == 0
