"""The training loop through its Python API: gradient accumulation, outputs (progress lines, JSONL, PNG), learning."""

import json

import pytest

from omnigpt.config import tiny
from omnigpt.data.packing import ListSource
from omnigpt.train.synthetic import markov_docs
from omnigpt.train.trainer import TrainConfig, TrainData, train

CFG = tiny(vocab_size=256, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def data():
    docs = [d + [0] for d in markov_docs(150, 256, seed=3)]
    return TrainData(train=[ListSource("a", docs[:100]), ListSource("b", docs[100:140])], val=[ListSource("a", docs[140:])])


def run(tmp_path, name, **kw):
    tc = TrainConfig(**{**dict(out_dir=str(tmp_path / name), steps=6, batch_size=4, seq_len=32, warmup_steps=2, log_every=1,
                               val_every=3, val_batches=2, ckpt_every=0, plot=False, device="cpu"), **kw})
    train(CFG, tc, data())
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_grad_accum_equals_the_bigger_batch(tmp_path):
    big = run(tmp_path, "big", batch_size=4, grad_accum=1)
    acc = run(tmp_path, "acc", batch_size=2, grad_accum=2)
    assert [r["loss"] for r in big if "loss" in r] == pytest.approx([r["loss"] for r in acc if "loss" in r], abs=1e-5)


def test_outputs_and_learning(tmp_path, capsys):
    recs = run(tmp_path, "wsd", steps=20, schedule="wsd", lr=1e-2, log_every=5, val_every=10, plot=True, optimizer="muon")
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("step ") and "tok/s" in line]
    assert len(lines) == 4 and all("MFU n/a" in line and "ETA" in line for line in lines)  # CPU: no peak FLOPs to compare
    train_recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train_recs] == [5, 10, 15, 20]
    assert all(r["mfu"] is None and r["tok_per_s"] > 0 for r in train_recs)
    val = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in val] == [10, 20] and "val/a" in val[0]
    assert val[-1]["val_loss"] < 4.6 < 5.545  # well below log(256): it learned the Markov chain
    assert (tmp_path / "wsd" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "wsd" / "checkpoints" / "latest").read_text() == "step_0000020"  # the final checkpoint
