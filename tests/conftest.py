import base64
import io
import os
import shutil

import pytest
import torch
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models are thousands of small ops: one intra-op thread is faster and immune to other processes on the
    machine (the serving engines run the same way, cpu_threads=1). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fail_nth_decode(engine, monkeypatch, n: int, message: str) -> None:
    """Make the engine's n-th decode step raise RuntimeError(message): a fault injected into a running engine."""
    real, calls = engine._decode, {"n": 0}

    def flaky(seqs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError(message)
        return real(seqs)

    monkeypatch.setattr(engine, "_decode", flaky)


def image_data_url(size=(8, 8), color=(200, 30, 30), fmt: str = "PNG") -> str:
    """A solid-colour image as a data URL."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


# ---- the web page in headless Chromium (Debian's, driven by Playwright) ----------------------------------------
@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("no chromium binary")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """The chat page of the requesting module's `server` fixture (a ServerThread), failing on JavaScript errors."""
    context = browser.new_context()
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    yield page
    context.close()
    assert not errors, errors  # no JavaScript exceptions
