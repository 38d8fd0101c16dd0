"""`omnigpt serve` as a real process (default checkpoint from $OMNIGPT_CHECKPOINT, API key) and `omnigpt chat`
talking to it; and the message that says how to get a model when there is none."""

import io
import os
import subprocess
import sys
import time

import httpx
import pytest

from omnigpt import cli
from omnigpt.serve.chat_client import run_chat
from omnigpt.serve.testing import make_tiny_checkpoint


def test_serve_without_a_checkpoint_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/speedrun/latest here
    monkeypatch.delenv("OMNIGPT_CHECKPOINT", raising=False)
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "omnigpt speedrun --preset cpu" in err


def test_serve_a_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["serve", str(tmp_path / "nope")]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), name="my-model")
    port = free_port()
    workdir = tmp_path_factory.mktemp("cwd")
    env = {**os.environ, "OMNIGPT_CHECKPOINT": str(ckpt), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from omnigpt.cli import main; sys.exit(main())", "serve", "--port", str(port),
         "--api-key", "sekret", "--max-batch-size", "4", "--threads", "1"],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("omnigpt serve exited: " + proc.stdout.read())
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("omnigpt serve did not come up")
    yield url
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    assert "my-model" in out  # the startup line names what is served


def test_serve_uses_the_default_checkpoint_and_the_api_key(server_process):
    assert httpx.get(server_process + "/v1/models").status_code == 401
    models = httpx.get(server_process + "/v1/models", headers={"Authorization": "Bearer sekret"}).json()
    assert [m["id"] for m in models["data"]] == ["my-model"]


def test_chat_client_streams_answers(server_process):
    stdin = io.StringIO("hello there\n/system be brief\nsecond question\n/reset\n/exit\nnever read\n")
    stdout = io.StringIO()
    code = run_chat(server_process + "/v1", None, "sekret", max_tokens=12, seed=1, stdin=stdin, stdout=stdout)
    out = stdout.getvalue()
    assert code == 0
    assert out.startswith("chatting with my-model")
    assert "(system prompt set)" in out and "(conversation cleared)" in out
    lines = out.split("\n")[:-1]  # (not splitlines: a random model writes control characters)
    answers = [l for l in lines[1:] if not l.startswith("(")]
    assert len(answers) == 2 and all(a.strip() for a in answers)


def test_chat_client_reports_server_errors(server_process, capsys):
    stdout = io.StringIO()
    assert run_chat(server_process + "/v1", None, "wrong-key", stdin=io.StringIO("hi\n"), stdout=stdout) == 2
    assert "401" in capsys.readouterr().err
    stdout = io.StringIO()
    code = run_chat(server_process + "/v1", "no-such-model", "sekret", stdin=io.StringIO("hi\n"), stdout=stdout)
    assert code == 0 and "[error] 404" in stdout.getvalue() and "does not exist" in stdout.getvalue()
