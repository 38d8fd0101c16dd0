"""Hugging Face interop: tiny random Llama / Mixtral / Qwen3-MoE models built locally with transformers (no hub),
converted both ways; float32 logits and greedy tokens must match."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from omnigpt.cli import main  # noqa: E402
from omnigpt.config import ModelConfig, RopeScaling  # noqa: E402
from omnigpt.infer.generate import generate  # noqa: E402
from omnigpt.infer.sampling import SamplingParams  # noqa: E402
from omnigpt.interop.hf import export_hf, import_hf  # noqa: E402
from omnigpt.model.transformer import Transformer  # noqa: E402
from omnigpt.model.weights import load_model, save_model  # noqa: E402

TOL = 1e-4
V = 256
COMMON = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, max_position_embeddings=128)
HF_CASES = {
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama-llama3-rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3-moe-norm": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[0], head_dim=16)),
    "qwen3-moe-nonorm": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[1],
        num_hidden_layers=3, tie_word_embeddings=True)),
}
MOE_CASES = [k for k in HF_CASES if "llama" not in k]


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights large enough that logits are O(1) and routing is decisive (HF's 0.02 init makes both tiny)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def hf_model(case: str):
    cfg_cls, model_cls, extra = HF_CASES[case]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra})
    torch.manual_seed(0)
    return randomize(getattr(transformers, model_cls)(cfg).float())


def ids(B=2, T=24, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def max_diff(ours: Transformer, hf, x) -> float:
    with torch.no_grad():
        a, b = ours.eval()(x).logits, hf(x).logits
    assert b.abs().max() > 0.5, "logits too small for a meaningful comparison"
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case, storage", [(c, s) for c in HF_CASES for s in ("single", "sharded", "fused") if s != "fused" or c in MOE_CASES])
def test_import_matches_hf_logits(case, storage, tmp_path):
    hf = hf_model(case)
    kw = {"single": {}, "sharded": {"max_shard_size": "40KB"}, "fused": {"save_original_format": False}}[storage]
    hf.save_pretrained(tmp_path, **kw)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert (len(files) > 1) == (storage == "sharded")
    keys = set().union(*(load_file(tmp_path / f).keys() for f in files))
    assert any("experts.gate_up_proj" in k for k in keys) == (storage == "fused")
    model = import_hf(tmp_path)
    d = max_diff(model, hf, ids())
    print(f"{case} {storage}: import max |dlogits| = {d:.2e}")
    assert d <= TOL


OURS = {
    "llama": ModelConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, tie_embeddings=True,
                         rope_scaling=RopeScaling("linear", factor=2.0), rope_theta=500000.0, norm_eps=1e-6),
    "mixtral": ModelConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, n_experts=4, top_k=2, d_ff_expert=96),
    "qwen3_moe": ModelConfig(vocab_size=V, d_model=64, n_layers=3, n_heads=4, n_kv_heads=1, head_dim=32, d_ff=80, n_experts=4,
                             top_k=2, d_ff_expert=48, qk_norm=True, norm_topk=False, dense_layers=(1,),
                             rope_scaling=RopeScaling("llama3", factor=4.0, original_max_seq_len=64)),
}


@pytest.mark.parametrize("arch", list(OURS))
def test_export_loads_in_transformers(arch, tmp_path):
    torch.manual_seed(0)
    model = randomize(Transformer(OURS[arch]), seed=3)
    hf_cfg = export_hf(model, tmp_path / "hf", max_shard_size="30KB" if arch == "mixtral" else None)
    assert hf_cfg["model_type"] == arch
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == hf_cfg["architectures"][0]
    d = max_diff(model, hf, ids(seed=2))
    print(f"{arch}: export max |dlogits| = {d:.2e}")
    assert d <= TOL
    back = import_hf(tmp_path / "hf")  # and back again, bit for bit
    expect = {**model.cfg.to_dict(), "d_ff": model.cfg.d_ff_expert if arch == "mixtral" else model.cfg.d_ff}
    if arch != "llama":
        expect["z_loss_coef"] = 0.0  # HF MoE models have no router z-loss
    assert back.cfg.to_dict() == expect
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


@pytest.mark.parametrize("case", ["llama-llama3-rope", "mixtral", "qwen3-moe-norm", "qwen3-moe-nonorm"])
def test_greedy_generation_matches_hf(case, tmp_path):
    hf = hf_model(case)
    hf.save_pretrained(tmp_path)
    model = import_hf(tmp_path).eval()
    prompts = [ids(1, 9, seed=5)[0].tolist(), ids(1, 4, seed=6)[0].tolist()]
    ours = [g.tokens for g in generate(model, prompts, SamplingParams(temperature=0, max_new_tokens=12))]

    T = max(map(len, prompts))
    x = torch.tensor([[0] * (T - len(p)) + p for p in prompts])  # HF wants left padding
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(x, attention_mask=mask, do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
    theirs = out[:, T:].tolist()
    assert ours == theirs


def test_cli_round_trip(tmp_path, capsys):
    hf = hf_model("qwen3-moe-norm")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert main(["convert", "import", str(tmp_path / "hf"), str(tmp_path / "og")]) == 0
    assert "Qwen3MoeForCausalLM" in capsys.readouterr().out
    model = load_model(tmp_path / "og")
    assert max_diff(model, hf, ids()) <= TOL
    assert main(["convert", "export", str(tmp_path / "og"), str(tmp_path / "hf2"), "--max-shard-size", "50KB"]) == 0
    out = capsys.readouterr().out
    assert "exported" in out and "parameters" in out
    assert (tmp_path / "hf2" / "model.safetensors.index.json").is_file()
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    assert max_diff(model, hf2, ids()) <= TOL
    # A MoE model cannot become a Llama: a one-line error, exit status 2.
    assert main(["convert", "export", str(tmp_path / "og"), str(tmp_path / "x"), "--arch", "llama"]) == 2
    assert "n_experts=4" in capsys.readouterr().err


def _tiny_llama_dir(tmp_path):
    hf_model("llama-tied").save_pretrained(tmp_path)
    return tmp_path, tmp_path / "model.safetensors"


def test_missing_tensor_is_named(tmp_path):
    path, f = _tiny_llama_dir(tmp_path)
    sd = load_file(f)
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, f)
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight' \(expected shape \(96, 64\)\)"):
        import_hf(path)


def test_wrong_shape_is_named(tmp_path):
    path, f = _tiny_llama_dir(tmp_path)
    sd = load_file(f)
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(sd, f)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(16, 64\), expected \(32, 64\)"):
        import_hf(path)


def test_unexpected_tensor_is_named(tmp_path):
    path, f = _tiny_llama_dir(tmp_path)
    sd = load_file(f)
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(sd, f)
    with pytest.raises(ValueError, match=r"unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"):
        import_hf(path)


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "unsupported architecture.*GPT2LMHeadModel"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_bad_config_refused(tmp_path, change, message):
    path, _ = _tiny_llama_dir(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=message):
        import_hf(path)


def test_legacy_rope_config_keys(tmp_path):
    """transformers 4 wrote rope_theta at the top level and rope_scaling with 'type'."""
    hf = hf_model("llama-tied")
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=10000.0, rope_scaling=None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = import_hf(tmp_path)
    assert model.cfg.rope_theta == 10000.0 and model.cfg.rope_scaling is None
    assert max_diff(model, hf, ids()) <= TOL
    cfg.update(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert import_hf(tmp_path).cfg.rope_scaling == RopeScaling("linear", factor=2.0)


def test_save_model_after_import_round_trips(tmp_path):
    hf = hf_model("mixtral")
    hf.save_pretrained(tmp_path / "hf")
    save_model(import_hf(tmp_path / "hf"), tmp_path / "og")
    assert max_diff(load_model(tmp_path / "og"), hf, ids()) <= TOL
