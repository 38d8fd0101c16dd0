"""Scaling laws: fits recover known parameters, refusals on bad sweeps, the ladder's bookkeeping, predict end to end."""

import json
import math

import numpy as np
import pytest

from omnigpt.scaling.fit import ScalingError, both_vary, check_points, curve_diverged, fit_chinchilla, fit_power_law
from omnigpt.scaling.ladder import LadderSpec, family_config, plan_run
from omnigpt.scaling.predict import check_runs, plot_prediction, predict, score


def law(C, a=40.0, b=0.12, c=1.6):
    return a * np.asarray(C, dtype=float) ** -b + c


def test_power_law_recovers_known_parameters():
    C = np.logspace(9, 11, 6)
    fit = fit_power_law(C, law(C))
    assert fit.b == pytest.approx(0.12, rel=1e-4)
    assert fit.c == pytest.approx(1.6, rel=1e-4)
    assert fit.a * fit.C0 ** fit.b == pytest.approx(40.0, rel=1e-3)  # a is quoted at C0
    assert fit(1e13) == pytest.approx(law(1e13), rel=1e-5)  # 100x past the largest point


def test_power_law_with_noise_predicts_within_a_percent():
    rng = np.random.default_rng(0)
    C = np.logspace(9, 11, 8)
    y = law(C) * np.exp(rng.normal(0, 0.001, len(C)))
    fit = fit_power_law(C, y)
    assert abs(fit(1e13) / law(1e13) - 1) < 0.01
    assert fit.rms_log < 0.003


def test_pure_power_law_with_fixed_floor():
    C = np.logspace(10, 12, 5)
    fit = fit_power_law(C, 3.0 * (C / 1e12) ** -0.3, irreducible=0.0)
    assert (fit.a, fit.b, fit.c) == pytest.approx((3.0, 0.3, 0.0), rel=1e-6)


def test_chinchilla_form_recovers_parameters_when_n_and_d_vary():
    N = np.repeat([1e5, 3e5, 1e6], 3)
    D = np.tile([1e6, 3e6, 1e7], 3)
    L = 1.7 + 400 / N ** 0.34 + 410 / D ** 0.28
    assert both_vary(N, D) and not both_vary(N, 20 * N)
    fit = fit_chinchilla(N, D, L)
    assert (fit.E, fit.alpha, fit.beta) == pytest.approx((1.7, 0.34, 0.28), rel=1e-3)
    with pytest.raises(ScalingError, match="same tokens per parameter"):
        fit_chinchilla(N, 20 * N, L)


@pytest.mark.parametrize("C,y,match", [
    ([1e9, 1e10], [3.0, 2.5], "2 point"),
    ([1e9, 1e10, 1e11], [3.0, float("nan"), 2.0], "NaN"),
    ([1e9, 1e10, 1e11], [3.0, float("inf"), 2.0], "NaN"),
    ([1e9, 1e10, 1e11], [2.0, 2.5, 3.0], "does not fall"),
    ([1e9, 1e9, 1e9], [3.0, 2.5, 2.0], "distinct"),
    ([1e9, 1e10, 1e11, 1e12], [3.0, 2.5, 2.6, 2.0], "rises with compute"),
])
def test_refuses_meaningless_points(C, y, match):
    with pytest.raises(ScalingError, match=match):
        check_points(C, y)
    with pytest.raises(ScalingError):
        fit_power_law(C, y)


def test_curve_diverged():
    assert curve_diverged([5.0, 4.0, 3.0, 2.9, 2.8]) is None
    assert curve_diverged([5.0, 4.0, 3.0, 2.2, 2.4, 2.2, 2.3, 2.1, 2.3]) is None  # batch noise
    assert "non-finite" in curve_diverged([5.0, 4.0, float("nan")])
    assert "rose" in curve_diverged([5.0, 3.0, 2.5, 2.4, 4.0, 6.0, 9.0])


def records(losses, flops=(1e9, 2e9, 4e9, 8e9), **extra):
    return [{"name": f"run{i}", "flops": f, "val_loss": l, "params": 1000 * (i + 1), "tokens": 20000 * (i + 1), **extra}
            for i, (f, l) in enumerate(zip(flops, losses))]


def test_predict_refuses_diverged_runs_and_oversized_runs():
    good = records(law([1e9, 2e9, 4e9, 8e9]))
    pred, _ = predict(good, "big", 1e12, max_fraction=0.01)
    assert pred.predicted == pytest.approx(float(law(1e12)), rel=1e-4)
    bad = [dict(r) for r in good]
    bad[2]["diverged"] = "loss rose from 3.1 to 4.0 at the end of training"
    with pytest.raises(ScalingError, match="run2"):
        predict(bad, "big", 1e12)
    bad = [dict(r) for r in good]
    bad[1]["val_loss"] = float("nan")
    with pytest.raises(ScalingError, match="diverged"):
        check_runs(bad)
    with pytest.raises(ScalingError, match="1/100"):
        predict(good, "big", 1e11, max_fraction=0.01)  # 8e9 is 1/12 of 1e11
    with pytest.raises(ScalingError, match="at least 3"):
        predict(good[:2], "big", 1e12)


def test_predict_on_the_6nd_axis_budgets_in_flops():
    from omnigpt.scaling.predict import axis_compute

    # losses that follow a power law in 6ND while the FLOPs (with attention) grow differently
    six_nd = [6.0 * 1000 * (i + 1) * 20000 * (i + 1) for i in range(4)]
    good = records(law(six_nd), flops=(3e9, 4e9, 6e9, 9e9))
    assert [axis_compute(r, "6nd") for r in good] == six_nd
    target_6nd = 6.0 * 30_000 * 600_000
    pred, _ = predict(good, "big", 1e12, max_fraction=0.01, axis="6nd", target_compute=target_6nd)
    assert pred.predicted == pytest.approx(float(law(target_6nd)), rel=1e-4) and pred.axis == "6nd"
    assert pred.largest_fraction == pytest.approx(9e9 / 1e12)  # the budget stays in FLOPs
    on_flops, _ = predict(good, "big", 1e12, max_fraction=0.01)
    assert abs(on_flops.predicted / pred.predicted - 1) > 0.01  # the axis matters
    with pytest.raises(ScalingError, match="1/100"):
        predict(good, "big", 1e11, axis="6nd", target_compute=target_6nd)  # 9e9 FLOPs is 1/11 of 1e11
    with pytest.raises(ValueError, match="target_compute"):
        predict(good, "big", 1e12, axis="6nd")
    with pytest.raises(ValueError, match="unknown fit axis"):
        axis_compute(good[0], "kaplan")


def test_backtest_chooses_between_fitted_floor_and_pure_power_law():
    from omnigpt.scaling.predict import choose_floor

    C = np.logspace(9, 11, 5)
    assert choose_floor(C, law(C))[0] is None  # the true law has a floor: fitting c backtests better
    pure = 5.0 * (C / 1e9) ** -0.05 * np.exp([0.002, -0.002, 0.002, -0.002, 0.0])
    floor, info = choose_floor(C, pure)
    assert floor == 0.0 and info["chosen"] == "c = 0"
    assert choose_floor(C[:3], law(C[:3]))[0] is None  # too few points to backtest: c is fitted


def test_downstream_metric_fitted_as_neg_log_rate(tmp_path):
    C = np.array([1e9, 3e9, 1e10, 3e10])
    acc = np.exp(-law(C, a=30.0, b=0.15, c=0.1))  # -log(acc) follows the law
    recs = records([2.0] * 4, flops=C)
    for r, a in zip(recs, acc):
        r["mc_acc"] = float(a)
    pred, fit = predict(recs, "big", 1e13, metric="mc_acc", max_fraction=0.01)
    assert pred.predicted == pytest.approx(float(np.exp(-law(1e13, a=30.0, b=0.15, c=0.1))), rel=1e-3)
    score(pred, pred.predicted * 1.01)
    assert pred.error == pytest.approx(-0.0099, abs=1e-4)
    plot_prediction(recs, fit, pred, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"


def test_family_and_plan_follow_the_flops_convention():
    spec = LadderSpec(dial="width", depth=2, seq_len=128, tokens_per_param=20, n_heads=2)
    cfg = family_config(48, spec, 512)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff) == (2, 48, 2, 24, 128)
    assert family_config(48, LadderSpec(n_heads=None, head_dim=16), 512).n_heads == 3
    p = plan_run(48, spec, 512)
    assert p.params == cfg.param_counts()["active_matmul"]
    assert p.tokens == p.steps * p.batch_size * 128 and abs(p.tokens / (20 * p.params) - 1) < 0.05
    assert p.flops == cfg.flops_per_token(128) * p.tokens
    deep = family_config(3, LadderSpec(dial="depth", aspect=32, n_heads=None), 512)
    assert (deep.n_layers, deep.d_model) == (3, 96)
    with pytest.raises(ValueError, match="exactly one"):
        LadderSpec(tokens_per_param=20, tokens=1000).validate()


def test_scaling_cli_sweeps_tiny_runs_and_refuses_oversized_fit(tmp_path, capsys):
    from omnigpt.cli import main
    from omnigpt.train.synthetic import write_synthetic_corpus

    write_synthetic_corpus(tmp_path / "corpus", {"alpha": 60}, vocab=64, val_docs=6)
    common = ["--data", str(tmp_path / "corpus"), "--out", str(tmp_path / "ladder"), "--seq-len", "32", "--head-dim", "8",
              "--tokens-per-param", "2", "--steps-ref", "300", "--downstream", "", "--threads", "1", "--val-tokens", "2000"]
    # 16 is ~1/4 of 48's compute: predict must refuse before training anything.
    assert main(["scaling", "predict", "--values", "8,16", "--target", "48", *common]) == 2
    assert "the limit is 1/100" in capsys.readouterr().err
    assert not (tmp_path / "ladder" / "runs.jsonl").exists()
    assert main(["scaling", "sweep", "--values", "8,12,16", *common]) == 0
    runs = [json.loads(line) for line in (tmp_path / "ladder" / "runs.jsonl").read_text().splitlines()]
    assert [r["value"] for r in runs] == [8, 12, 16]
    assert all(math.isfinite(r["val_loss"]) and r["flops"] > 0 for r in runs)
    assert (tmp_path / "ladder" / "fit.png").is_file()
    # Resumable: a second sweep trains nothing new.
    assert main(["scaling", "sweep", "--values", "8,12,16", *common]) == 0
    assert len((tmp_path / "ladder" / "runs.jsonl").read_text().splitlines()) == 3
    # the same runs fitted against 6ND instead of FLOPs
    capsys.readouterr()
    assert main(["scaling", "fit", str(tmp_path / "ladder" / "runs.jsonl"), "--fit-axis", "6nd"]) == 0
    assert '"axis": "6nd"' in capsys.readouterr().out
    # Extra seeds of one size (e.g. a target's, trained side by side): recorded, and no fit of one point is attempted.
    assert main(["scaling", "sweep", "--values", "8", "--seeds", "1", *common]) == 0
    assert "no fit (it needs 3 or more sizes)" in capsys.readouterr().out
    assert json.loads((tmp_path / "ladder" / "runs.jsonl").read_text().splitlines()[-1])["name"] == "width8-r2-s1"


def test_family_flags_reach_the_spec():
    from omnigpt.cli import build_parser
    from omnigpt.scaling.commands import _spec

    args = build_parser().parse_args(["scaling", "sweep", "--values", "8", "--data", "d", "--out", "o",
                                      "--fixed-attention", "--n-heads", "2", "--head-dim", "16", "--fit-axis", "6nd"])
    spec = _spec(args)
    assert (spec.fixed_attention, spec.n_heads, spec.head_dim, args.fit_axis) == (True, 2, 16, "6nd")
    cfg = plan_run(40, spec, 320).cfg
    assert (cfg.d_model, cfg.n_heads, cfg.head_dim) == (40, 2, 16)  # attention independent of the width
    plain = _spec(build_parser().parse_args(["scaling", "sweep", "--values", "8", "--data", "d", "--out", "o"]))
    assert not plain.fixed_attention and plain.n_heads == LadderSpec().n_heads


def test_plan_fixed_batch_or_fixed_steps():
    p = plan_run(48, LadderSpec(n_heads=2), 320)  # default: 4 rows per step at every size, the steps take the rest
    assert p.batch_size == 4 and p.steps == round(20 * p.params / (4 * 128))
    q = plan_run(48, LadderSpec(n_heads=2, batch_size=None, steps_ref=300), 320)  # the old rule: 300 steps, batch grows
    assert abs(q.steps - 300) <= 15 and q.batch_size > 4
    assert plan_run(8, LadderSpec(n_heads=2), 320).lr == pytest.approx(5e-3 * 64 / 8)


def test_recipe_knobs_reach_the_trainer(tmp_path, monkeypatch):
    import omnigpt.train.trainer as trainer
    from omnigpt.scaling.ladder import run_one
    from omnigpt.train.synthetic import write_synthetic_corpus

    write_synthetic_corpus(tmp_path / "corpus", {"alpha": 20}, vocab=64, val_docs=2)
    seen = {}

    def fake_train(cfg, tc, data):
        seen.update(tc=tc, cfg=cfg)
        raise FloatingPointError("stop here")

    monkeypatch.setattr(trainer, "train", fake_train)
    spec = LadderSpec(seq_len=32, head_dim=8, n_heads=None, tokens_per_param=2, batch_size=2, beta2=0.99,
                      min_lr_ratio=0.0, weight_decay=0.05, warmup_frac=0.1, downstream="")
    rec = run_one(plan_run(16, spec, 64), spec, tmp_path / "corpus", tmp_path / "out", log=lambda m: None)
    tc = seen["tc"]
    assert (tc.batch_size, tc.beta2, tc.min_lr_ratio, tc.weight_decay) == (2, 0.99, 0.0, 0.05)
    assert tc.warmup_steps == max(1, round(0.1 * tc.steps)) and tc.schedule == "cosine"
    assert rec["diverged"] == "stop here" and rec["recipe"]["beta2"] == 0.99
    assert rec["recipe"]["tokenizer_sha256"] == "synthetic-64"


def test_sweep_refuses_to_mix_recipes(tmp_path):
    from omnigpt.scaling.ladder import append_run, sweep
    from omnigpt.train.synthetic import write_synthetic_corpus

    write_synthetic_corpus(tmp_path / "corpus", {"alpha": 20}, vocab=64, val_docs=2)
    spec = LadderSpec(seq_len=32, head_dim=8, n_heads=None, tokens_per_param=2, downstream="")
    append_run(tmp_path / "out" / "runs.jsonl", {"name": "width8-r2", "spec": {}, "recipe": {"lr": 0.01}})
    with pytest.raises(ValueError, match="another recipe or corpus"):
        sweep([8], spec, tmp_path / "corpus", tmp_path / "out", log=lambda m: None)


def test_accuracy_at_the_prior_is_refused_a_rising_one_is_not():
    C = [1e9, 2e9, 4e9, 8e9]
    flat = records([3.0, 2.9, 2.8, 2.7], flops=C)
    for r, a in zip(flat, [0.770, 0.772, 0.771, 0.775]):  # a tag task where 77% of the answers are "n"
        r.update(mc_acc=a, mc_prior=0.7735, mc_n=574)
    with pytest.raises(ScalingError, match="without reading the question"):
        predict(flat, "big", 1e12, metric="mc_acc")
    predict(flat, "big", 1e12, metric="val_loss")  # the loss of the same runs is fine
    rising = records([3.0, 2.9, 2.8, 2.7], flops=C)
    for r, a in zip(rising, [0.30, 0.34, 0.38, 0.42]):
        r.update(mc_acc=a, mc_prior=0.25, mc_n=400)
    pred, _ = predict(rising, "big", 1e12, metric="mc_acc")
    assert 0.42 < pred.predicted < 1


def test_answer_prior_is_chance_or_the_most_common_answer():
    from omnigpt.evals.tasks import MCItem
    from omnigpt.scaling.ladder import answer_prior

    tags = ["n", "v", "adj", "adv"]
    assert answer_prior([MCItem("a\n", tags, 0)] * 3 + [MCItem("b\n", tags, 1)]) == pytest.approx(0.75)
    assert answer_prior([MCItem("q", [f" {i}{j}" for j in range(4)], 0) for i in range(5)]) == pytest.approx(0.25)
