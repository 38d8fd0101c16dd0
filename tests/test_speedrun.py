"""The speedrun end to end on a small generated corpus: corpus, tokenizer, training, report, served model, resume."""

import json
import random

from omnigpt.serve.checkpoint import load_for_serving
from omnigpt.speedrun import run_speedrun


def write_corpus(folder, n=60, seed=0):
    rng = random.Random(seed)
    words = "the a king queen said river stone light dark old new went came over under".split()
    folder.mkdir()
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(40, 120)))
        (folder / f"doc{i:03d}.txt").write_text(text.capitalize() + ".\n")


def test_speedrun_end_to_end_and_rerun(tmp_path, capsys):
    write_corpus(tmp_path / "texts")
    out = tmp_path / "run"
    result = run_speedrun("cpu", str(out), steps=4, inputs=[str(tmp_path / "texts")])
    printed = capsys.readouterr().out
    assert result["steps"] == 4 and result["val"]["val_loss"] > 0
    assert "unigram loss" in printed and "val loss" in printed
    summary = json.loads((out / "speedrun.json").read_text())
    assert set(summary["unigram"]) == {"texts"}
    served = load_for_serving(out / "latest")
    assert served.tokenizer.vocab_size <= served.model.cfg.vocab_size
    # Running again finds every stage done and repeats only the report.
    again = run_speedrun("cpu", str(out), steps=4, inputs=[str(tmp_path / "texts")])
    assert again["val"] == result["val"]
    assert "corpus already built" in capsys.readouterr().out
