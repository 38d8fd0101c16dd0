"""The static-shape decode step behind CUDA graphs (omnigpt/infer/cuda_graphs.py), checked on CPU: the same
forward runs without capture, so bucketing, idle rows and the shared cache are tested here; the graphs
themselves are checked on a GPU by benchmarks/decode.py."""

import pytest
import torch

from omnigpt.config import ModelConfig
from omnigpt.infer.cuda_graphs import CudaGraphDecoder
from omnigpt.infer.kv_rows import CacheRows
from omnigpt.model.transformer import KVCache, Transformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=300)


def model():
    torch.manual_seed(0)
    return Transformer(CFG).eval()


def full_logits(m, seq):
    with torch.no_grad():
        return m(torch.tensor([seq])).logits[0, -1]


def test_decode_with_idle_row_matches_full_forward_across_buckets():
    """Rows 0 and 2 decode from prompts of different lengths past the 128-slot bucket into the 256 one; row 1 is
    idle (position max_len). Every step's logits equal a full forward over the sequence so far."""
    m = model()
    max_len = 300
    engine_cache = KVCache(CFG, 4, max_len + 1)  # an engine's cache: more rows than the decoder uses
    dec = CudaGraphDecoder(m, 3, max_len, cache=engine_cache, graphs=False)
    assert dec.buckets == [128, 256, 300]
    prompts = {0: torch.randint(0, 96, (120,)).tolist(), 2: torch.randint(0, 96, (7,)).tolist()}
    with torch.no_grad():
        for row, p in prompts.items():  # prefill each live row into the shared cache
            pos = torch.arange(len(p)).view(1, -1)
            m(torch.tensor([p]), pos_BT=pos, cache=CacheRows(engine_cache, [row]))
    seqs = {row: list(p) for row, p in prompts.items()}
    nxt = {row: int(full_logits(m, p).argmax()) for row, p in prompts.items()}
    for _ in range(12):  # row 0 crosses position 128
        tokens = torch.zeros(3, dtype=torch.long)
        pos = torch.full((3,), max_len)
        for row in seqs:
            tokens[row], pos[row] = nxt[row], len(seqs[row])
        out = dec.step(tokens, pos, max(len(s) for s in seqs.values())).clone()
        for row in seqs:
            seqs[row].append(nxt[row])
            torch.testing.assert_close(out[row], full_logits(m, seqs[row]), atol=2e-5, rtol=1e-4)
            nxt[row] = int(out[row].argmax())
    # The idle row wrote only the spare slot; the fourth row, outside the decoder, was never touched.
    assert engine_cache.k[:, 1, :max_len].abs().sum() == 0 and engine_cache.k[:, 1, max_len].abs().sum() > 0
    assert engine_cache.k[:, 3].abs().sum() == 0
    assert len(seqs[0]) > 128


@pytest.mark.parametrize("greedy_in_step", [False, True])
def test_own_cache_prefill_then_greedy_equals_generate(greedy_in_step):
    from omnigpt.infer.generate import generate
    from omnigpt.infer.sampling import SamplingParams

    m = model()
    prompt = torch.randint(0, 96, (1, 9))
    dec = CudaGraphDecoder(m, 1, 64, graphs=False, greedy=greedy_in_step)
    tok = dec.prefill(prompt, [9]).argmax(-1)
    out = []
    for i in range(10):
        out.append(int(tok))
        step = dec.step(tok, torch.tensor([9 + i]), 9 + i)
        tok = step if greedy_in_step else step.argmax(-1)
    assert out == generate(m, [prompt[0].tolist()], SamplingParams(temperature=0, max_new_tokens=10))[0].tokens


def test_cache_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="max_len"):
        CudaGraphDecoder(model(), 2, 64, cache=KVCache(CFG, 2, 64), graphs=False)

