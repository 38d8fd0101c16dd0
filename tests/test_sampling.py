"""Sampling settings match Hugging Face's logits processors; seeds reproduce; stop strings cut the text."""

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
)

from omnigpt.config import tiny
from omnigpt.infer.generate import generate
from omnigpt.infer.sampling import SamplingParams, apply_penalties, filter_logits, stack_params
from omnigpt.model.transformer import Transformer


def finite_mask(x):
    return torch.isfinite(x)


@pytest.mark.parametrize("setting", [
    dict(temperature=0.7), dict(top_k=5), dict(top_p=0.9), dict(min_p=0.05), dict(temperature=1.3, top_k=20, top_p=0.8),
])
def test_filters_match_hf_warpers(setting):
    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 3
    p = SamplingParams(**setting)
    s = stack_params([p] * 4, "cpu")
    ours = filter_logits(logits, s["temperature"], s["top_k"], s["top_p"], s["min_p"])
    ref = logits.clone()
    ids = torch.zeros(4, 1, dtype=torch.long)
    if p.temperature != 1.0:
        ref = TemperatureLogitsWarper(p.temperature)(ids, ref)
    if p.top_k:
        ref = TopKLogitsWarper(p.top_k)(ids, ref)
    if p.top_p < 1:
        ref = TopPLogitsWarper(p.top_p)(ids, ref)
    if p.min_p:
        ref = MinPLogitsWarper(p.min_p)(ids, ref)
    assert torch.equal(finite_mask(ours), finite_mask(ref))
    torch.testing.assert_close(ours[finite_mask(ours)], ref[finite_mask(ref)])


def test_rows_keep_their_own_settings():
    torch.manual_seed(0)
    logits = torch.randn(2, 100)
    s = stack_params([SamplingParams(top_k=3), SamplingParams()], "cpu")
    out = filter_logits(logits, s["temperature"], s["top_k"], s["top_p"], s["min_p"])
    assert int(torch.isfinite(out[0]).sum()) == 3 and bool(torch.isfinite(out[1]).all())


def test_repetition_penalty_matches_hf_and_openai_penalties():
    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    ids = torch.tensor([[3, 7, 7, 20]])
    seen = torch.zeros(1, 50, dtype=torch.bool)
    seen[0, ids[0]] = True
    counts = torch.zeros(1, 50, dtype=torch.long)
    ours = apply_penalties(logits, seen, counts, torch.tensor([1.3]), torch.zeros(1), torch.zeros(1))
    torch.testing.assert_close(ours, RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone()))
    counts[0, 7] = 2
    out = apply_penalties(logits, seen, counts, torch.ones(1), torch.tensor([0.5]), torch.tensor([0.25]))
    assert torch.isclose(out[0, 7], logits[0, 7] - 0.5 - 0.5) and torch.equal(out[0, 8], logits[0, 8])


def test_seed_reproduces_and_stop_strings_cut():
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    decode = lambda ids: "".join(chr(97 + i % 26) for i in ids)  # noqa: E731  a toy id->text map for the test
    p = SamplingParams(temperature=1.0, max_new_tokens=20, seed=123)
    a = generate(model, [[1, 2, 3]], p, decode=decode)[0]
    b = generate(model, [[1, 2, 3], [9, 9]], [p, SamplingParams(seed=7)], decode=decode)[0]
    assert a.tokens == b.tokens and len(a.tokens) == 20 and a.finish_reason == "length"
    stop = a.text[5:7]
    cut = generate(model, [[1, 2, 3]], SamplingParams(temperature=1.0, max_new_tokens=20, seed=123, stop=(stop,)), decode=decode)[0]
    assert cut.finish_reason == "stop" and cut.text == a.text[: a.text.find(stop)]
    eos = generate(model, [[1, 2, 3]], p, eos_ids=(a.tokens[4],), decode=decode)[0]
    assert eos.tokens == a.tokens[: a.tokens.index(a.tokens[4]) + 1] and eos.finish_reason == "stop"


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    model = Transformer(tiny())
    with pytest.raises(ValueError, match="exceeds the context"):
        generate(model, [[1] * 250], SamplingParams(max_new_tokens=10))
