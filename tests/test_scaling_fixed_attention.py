"""LadderSpec.fixed_attention: the same n_heads x head_dim attention at every width (issue 7's family A)."""

import pytest

from omnigpt.model.transformer import Transformer
from omnigpt.scaling.ladder import LadderSpec, family_config, plan_run, recipe_key


def test_fixed_attention_keeps_heads_and_head_dim_at_every_width():
    spec = LadderSpec(fixed_attention=True, n_heads=2, head_dim=16)
    for width in (8, 20, 112):
        cfg = family_config(width, spec, 320)
        assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (width, 2, 2, 16)
        assert cfg.d_ff == family_config(width, LadderSpec(), 320).d_ff  # the MLP follows the width as before
    small = family_config(8, spec, 320)
    model = Transformer(small)
    assert model.layers[0].attn.wqkv.weight.shape == (3 * 32, 8)
    assert sum(p.numel() for p in model.parameters()) == small.param_counts()["total"]
    p = plan_run(8, spec, 320)
    assert p.flops == small.flops_per_token(128) * p.tokens  # the attention term counts 2 x 16 dims, not the width
    # the default family is unchanged: head_dim follows the width
    assert family_config(8, LadderSpec(), 320).head_dim == 4


def test_fixed_attention_needs_a_head_count_and_stays_out_of_old_recipe_keys(tmp_path):
    with pytest.raises(ValueError, match="n_heads"):
        family_config(8, LadderSpec(fixed_attention=True, n_heads=None), 320)
    from omnigpt.train.synthetic import write_synthetic_corpus

    write_synthetic_corpus(tmp_path / "corpus", {"alpha": 4}, vocab=64, val_docs=1)
    assert "fixed_attention" not in recipe_key(LadderSpec(), tmp_path / "corpus")  # runs recorded before the field still match
    assert recipe_key(LadderSpec(fixed_attention=True), tmp_path / "corpus")["fixed_attention"] is True


def _scaling_diag():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling_diag.py"
    spec = importlib.util.spec_from_file_location("scaling_diag", path)
    diag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag)
    return diag


def test_scaling_diag_backtest_on_a_6nd_axis(tmp_path, capsys):
    """backtest --convention 6nd fits on 6 * params * tokens, not the records' flops (which add the attention scores)."""
    import json
    from types import SimpleNamespace

    spec = LadderSpec(fixed_attention=True, downstream="", mc_items=0)
    lines = []
    for width in (8, 12, 16, 20, 112):
        p = plan_run(width, spec, 320)
        loss = 3.0 * (6 * p.params * p.tokens / 1e10) ** -0.06  # a law in 6ND: the flops of the record bend it
        lines.append(json.dumps({"name": p.name, "value": width, "flops": p.flops, "params": p.params, "tokens": p.tokens, "val_loss": loss}))
    (tmp_path / "runs.jsonl").write_text("\n".join(lines) + "\n")
    args = {"runs": [str(tmp_path / "runs.jsonl")], "fit": "8,12,16,20", "held": 112, "at_flops": None, "bootstrap": 0}
    diag = _scaling_diag()
    diag.cmd_backtest(SimpleNamespace(**args, convention="6nd"))
    out = capsys.readouterr().out
    assert "6nd FLOPs" in out and ("error +0.00%" in out or "error -0.00%" in out)
    diag.cmd_backtest(SimpleNamespace(**args, convention="omnigpt"))
    out = capsys.readouterr().out
    assert "omnigpt FLOPs" in out and "error +0.00%" not in out and "error -0.00%" not in out


def test_scaling_diag_backtest_predicts_an_untrained_width(tmp_path, capsys):
    """backtest --predict-width plans the width with the fit runs' recorded recipe and predicts without a held-out run."""
    import json
    from dataclasses import asdict
    from types import SimpleNamespace

    from omnigpt.train.synthetic import write_synthetic_corpus

    write_synthetic_corpus(tmp_path / "corpus", {"alpha": 4}, vocab=64, val_docs=1)
    spec = LadderSpec(fixed_attention=True, downstream="", mc_items=0)
    lines = []
    for width in (8, 12, 16, 20):
        p = plan_run(width, spec, 320)
        loss = 3.0 * (6 * p.params * p.tokens / 1e10) ** -0.06
        lines.append(json.dumps({"name": p.name, "value": width, "flops": p.flops, "params": p.params, "tokens": p.tokens,
                                 "val_loss": loss, "spec": asdict(spec), "model": p.cfg.to_dict()}))
    (tmp_path / "runs.jsonl").write_text("\n".join(lines) + "\n")
    diag = _scaling_diag()
    args = SimpleNamespace(runs=[str(tmp_path / "runs.jsonl")], fit="8,12,16,20", held=0, at_flops=None, bootstrap=20,
                           convention="6nd", predict_width=160, data=str(tmp_path / "corpus"), write=str(tmp_path / "pred.json"))
    diag.cmd_backtest(args)
    assert "width 160: predicted" in capsys.readouterr().out
    rec = json.loads((tmp_path / "pred.json").read_text())
    t = plan_run(160, spec, 320)
    assert (rec["params"], rec["tokens"], rec["flops_omnigpt"]) == (t.params, t.tokens, t.flops)
    assert rec["predicted"] == pytest.approx(3.0 * (6 * t.params * t.tokens / 1e10) ** -0.06, rel=1e-6)
    assert rec["largest_fit_fraction_omnigpt"] == pytest.approx(plan_run(20, spec, 320).flops / t.flops)
    assert rec["epochs"] > 0 and len(rec["interval90"]) == 2

def test_scaling_diag_frontier_keeps_cheapest_winners_and_places_held_out(tmp_path, capsys):
    """benchmarks/scaling_diag.py frontier (Chinchilla approach 1 on final losses) on runs of a known law."""
    import json
    from types import SimpleNamespace

    diag = _scaling_diag()
    spec = LadderSpec(downstream="", mc_items=0)
    lines = []
    for width, ratios in {8: [20, 80], 12: [20], 16: [5, 20], 20: [20]}.items():
        for r in ratios:
            for seed in (0, 1):
                p = plan_run(width, spec, 320, tokens_per_param=r, seed=seed)
                # a frontier at 20 tokens per parameter: other budgets lose 0.1 nats at their compute
                loss = 3.0 * (p.flops / 1e10) ** -0.06 + (0.0 if r == 20 else 0.1) + 0.001 * seed
                lines.append(json.dumps({"name": p.name, "value": width, "flops": p.flops, "params": p.params, "val_loss": loss}))
    (tmp_path / "runs.jsonl").write_text("\n".join(lines) + "\n")
    diag.cmd_frontier(SimpleNamespace(runs=[str(tmp_path / "runs.jsonl")], max_flops=1e11, at_flops=1e12, held="width12-r20"))
    out = capsys.readouterr().out
    assert "frontier: 4 points (8 runs)" in out  # the 20-per-parameter runs
    assert float(out.split("^(-")[1].split(")")[0]) == pytest.approx(0.06, rel=1e-3)  # the law recovered
    assert "error +0.0" in out or "error -0.0" in out  # width 12 is on the fitted frontier
    width, ratio = out.split("held-out width ")[1].split(" at ")[0].split()[0], out.split(" tokens per parameter")[0].split()[-1]
    assert int(width) % 4 == 0 and int(width) > 20 and abs(float(ratio) - 20) < 2  # on the 20-per-parameter frontier
