"""`omnigpt train` killed with SIGKILL mid-run and resumed repeats the uninterrupted run's losses exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from omnigpt.train.synthetic import write_synthetic_corpus

STEPS = 12


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_cmd(data, out, *extra):
    return [sys.executable, "-m", "omnigpt.train", "--data", str(data), "--out", str(out), "--preset", "tiny",
            "--model", "d_model=32", "--model", "n_heads=2", "--model", "n_kv_heads=1", "--model", "d_ff=64",
            "--steps", str(STEPS), "--batch-size", "2", "--seq-len", "32", "--warmup", "3", "--log-every", "1",
            "--val-every", "4", "--val-batches", "2", "--ckpt-every", "3", "--keep", "2", "--no-plot", "--device", "cpu", *extra]


def env():
    # One thread: the same float32 reduction order in every process (and no fight over 2 cores).
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def losses(out):
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r], [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus")
    write_synthetic_corpus(path, {"alpha": 120, "beta": 60}, vocab=256)
    return path


def test_sigkill_then_resume_matches_uninterrupted(corpus, tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(train_cmd(corpus, ref), env=env(), check=True, capture_output=True, timeout=300)
    ref_train, ref_val = losses(ref)
    assert [s for s, _ in ref_train] == list(range(1, STEPS + 1))

    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(corpus, run, "--debug-step-sleep", "0.4"), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 240
    # Kill once a checkpoint past step 3 exists, i.e. somewhere in the middle of steps 7..9.
    while not (latest.is_file() and latest.read_text().strip() >= "step_0000006"):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(s for s, _ in losses(run)[0])
    assert killed_at < STEPS, "the run finished before it was killed"

    resumed = subprocess.run(train_cmd(corpus, run, "--resume"), env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    got_train, got_val = losses(run)
    assert got_train == ref_train  # exact float equality, every step
    assert got_val == ref_val


def test_bad_input_is_named(corpus, tmp_path, capsys):
    from omnigpt.cli import main

    def fails(*args):
        assert main(["train", *args]) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    (tmp_path / "empty").mkdir()
    out = ["--out", str(tmp_path / "o")]
    assert "no manifest.json" in fails("--data", str(tmp_path / "empty"), *out)
    assert "no such directory" in fails("--data", str(tmp_path / "missing"), *out)
    assert "vocab_size=64 is smaller" in fails("--data", str(corpus), *out, "--model", "vocab_size=64")
    assert "'gamma'" in fails("--data", str(corpus), *out, "--mix", "gamma=1")
    assert "--steps must be positive" in fails("--data", str(corpus), *out, "--steps", "0")


def test_resume_on_shards_of_another_tokenizer_stops(corpus, tmp_path, capsys):
    from omnigpt.cli import main

    small = ["--out", str(tmp_path / "run"), "--model", "d_model=32", "--model", "n_heads=2", "--model", "n_kv_heads=1",
             "--batch-size", "1", "--seq-len", "16", "--val-every", "0", "--no-plot", "--warmup", "1", "--device", "cpu"]
    assert main(["train", "--data", str(corpus), "--steps", "1", *small]) == 0
    assert main(["train", "--data", str(corpus), "--steps", "1", *small]) == 2  # no silent overwrite
    assert "pass --resume" in capsys.readouterr().err
    other = tmp_path / "other"
    manifest = write_synthetic_corpus(other, {"alpha": 20}, vocab=256, seed=1)
    manifest["tokenizer"]["sha256"] = "another-tokenizer"
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert main(["train", "--data", str(other), "--steps", "2", "--resume", *small]) == 2
    assert "another tokenizer" in capsys.readouterr().err
