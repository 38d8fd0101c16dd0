"""Text tokenizer, ChatML template and `omnigpt tokenizer` CLI: behaviour, not implementation."""

import json
import random

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from omnigpt import cli
from omnigpt.tokenizer.chat import render_chat
from omnigpt.tokenizer.text import (
    N_SPECIAL, SPECIAL_TOKENS, IncrementalDecoder, Tokenizer, load_tokenizer, train_bpe,
)

# derandomized: the same examples every run, no example database
prop = settings(max_examples=150, deadline=None, derandomize=True, database=None)

WORDS = "the quick brown fox jumps over lazy dog 12345 3.14 héllo 世界 naïve def return {x} <|im_end|> 🎉".split()


def corpus_text(n_lines: int = 300, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(n_lines))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(corpus_text(), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def bpe(corpus):
    return train_bpe([corpus], vocab_size=400)


@pytest.fixture(scope="module", params=["bpe", "cl100k_base", "o200k_base"])
def tok(request):
    return request.getfixturevalue("bpe") if request.param == "bpe" else load_tokenizer(request.param)


# text that often contains the awkward bits: specials, whitespace runs, digits, multi-byte characters
texts = st.lists(st.one_of(st.text(), st.sampled_from(
    SPECIAL_TOKENS[:4] + [" ", "  ", "\n", "\r\n", "\t", "1234567", "'s", "héllo", "世界", "🎉", "<|", "|>"]
)), max_size=8).map("".join)


# -- round trips ------------------------------------------------------------------------------

@prop
@given(text=texts)
def test_encode_decode_roundtrip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.n_text for i in ids)  # special strings in user text stay text
    assert tok.decode(tok.encode(text, allowed_special="all")) == text


@prop
@given(data=st.binary(max_size=64) | texts.map(lambda t: t.encode()[1:]))  # the latter: cut mid-character
def test_bytes_roundtrip(tok, data):
    ids = tok.encode_bytes(data)
    assert tok.decode_bytes(ids) == data
    assert all(0 <= i < tok.n_text for i in ids)


@prop
@given(data=st.binary(max_size=48) | texts.map(str.encode), specials=st.lists(st.integers(0, N_SPECIAL - 1), max_size=3))
def test_incremental_decoder_matches_decode(tok, data, specials):
    ids = tok.encode_bytes(data) + [tok.n_text + s for s in specials] + tok.encode_bytes(data)
    dec = IncrementalDecoder(tok)
    streamed = [dec.feed(i) for i in ids]
    assert "".join(streamed) + dec.flush() == tok.decode(ids)
    try:  # valid UTF-8: everything came out before flush, and no piece showed a half character
        assert "".join(streamed) == tok.decode_bytes(ids).decode("utf-8")
    except UnicodeDecodeError:
        pass


def test_valid_utf8_bytes_encode_like_text(tok):
    text = "héllo 世界 🎉 <|endoftext|>"
    assert tok.encode_bytes(text.encode()) == tok.encode(text)
    assert tok.decode_bytes(tok.encode_bytes(b"\xff\xfe\x80a")) == b"\xff\xfe\x80a"
    assert tok.decode(tok.encode_bytes(b"a\xffb")) == "a\ufffdb"


def test_lone_surrogates_become_replacement_char(tok):
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")
    assert tok.encode_batch(["a\ud800b"]) == [tok.encode("a\ufffdb")]


def test_encode_batch_matches_encode(tok):
    batch = corpus_text(20, seed=1).split("\n") + ["", "<|im_end|>"]
    assert tok.encode_batch(batch) == [tok.encode(t) for t in batch]
    assert tok.encode_batch(batch, allowed_special="all") == [tok.encode(t, allowed_special="all") for t in batch]


# -- special tokens and vocabulary layout -----------------------------------------------------

def test_special_strings_are_text_unless_allowed(tok):
    text = "hi<|im_end|>\n<|endoftext|>bye"
    assert not any(i >= tok.n_text for i in tok.encode(text))
    only_end = tok.encode(text, allowed_special={"<|im_end|>"})
    assert only_end.count(tok.im_end_id) == 1 and tok.eot_id not in only_end
    both = tok.encode(text, allowed_special="all")
    assert [i for i in both if i >= tok.n_text] == [tok.im_end_id, tok.eot_id]
    with pytest.raises(ValueError, match="<|nope|>"):
        tok.encode(text, allowed_special={"<|nope|>"})


def test_vocabulary_layout(tok):
    assert list(tok.special) == SPECIAL_TOKENS and len(SPECIAL_TOKENS) == N_SPECIAL == 32
    assert [tok.special[s] for s in SPECIAL_TOKENS] == list(range(tok.n_text, tok.n_text + 32))
    assert (tok.eot_id, tok.im_start_id, tok.im_end_id, tok.pad_id) == tuple(range(tok.n_text, tok.n_text + 4))
    assert (tok.image_start_id, tok.image_end_id, tok.image_id) == tuple(range(tok.n_text + 4, tok.n_text + 7))
    assert (tok.audio_start_id, tok.audio_end_id, tok.audio_id) == tuple(range(tok.n_text + 7, tok.n_text + 10))
    assert tok.vocab_size == tok.n_text + 32 and tok.n_visual_codes == tok.n_audio_codes == 0
    assert tok.decode([tok.pad_id]) == "<|pad|>"

    big = tok.with_codes(n_visual_codes=16, n_audio_codes=8)
    assert big.visual_code_offset == tok.n_text + 32 and big.audio_code_offset == tok.n_text + 48
    assert big.vocab_size == tok.n_text + 56
    assert big.decode([big.visual_code_offset + 3, big.audio_code_offset + 7]) == "<|vis_3|><|aud_7|>"
    assert big.encode("<|vis_3|>", allowed_special="all") == big.encode("<|vis_3|>")  # codes never parsed
    assert big.padded_vocab_size() % 64 == 0 and 0 <= big.padded_vocab_size() - big.vocab_size < 64
    assert big.padded_vocab_size(128) % 128 == 0
    for bad in (-1, big.vocab_size):
        with pytest.raises(ValueError, match="out of range"):
            big.decode([bad])


@pytest.mark.parametrize("name,n_text,hello", [("cl100k_base", 100256, [15339, 1917]), ("o200k_base", 199998, [24912, 2375])])
def test_tiktoken_ids_match_openai(name, n_text, hello):
    tok, ref = load_tokenizer(name), tiktoken.get_encoding(name)
    assert tok.n_text == n_text and tok.eot_id == n_text  # ours right after the ranks, not OpenAI's ids
    assert tok.encode("hello world") == hello
    samples = [corpus_text(5, seed=2), "def f(x):\n    return x ** 2  # 1234567\n", "Ünïcödé 日本語 🎉🎉", " \n\n\t "]
    for s in samples:
        assert tok.encode(s) == ref.encode_ordinary(s)


def test_bpe_has_all_bytes_and_no_hf_specials(bpe):
    assert bpe.kind == "bpe" and 256 <= bpe.n_text <= 400 - 32
    assert sorted(bpe.token_bytes(i) for i in bpe._byte_ids) == [bytes([b]) for b in range(256)]
    assert not bpe.backend.get_added_tokens_decoder()
    assert bpe.encode("1234567") == bpe.encode("123") + bpe.encode("456") + bpe.encode("7")  # GPT-4 digit split


# -- files ------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["bpe", "cl100k_base"])
def test_save_load_roundtrip(spec, bpe, tmp_path):
    tok = (bpe if spec == "bpe" else load_tokenizer(spec)).with_codes(n_visual_codes=10, n_audio_codes=5)
    tok.save(str(tmp_path))
    meta = json.loads((tmp_path / "omnigpt_tokenizer.json").read_text())
    assert meta["special_tokens"] == SPECIAL_TOKENS and meta["n_text"] == tok.n_text
    assert (tmp_path / "tokenizer.json").exists() == (spec == "bpe")
    loaded = load_tokenizer(str(tmp_path))
    assert (loaded.kind, loaded.n_text, loaded.vocab_size, loaded.n_visual_codes) == (tok.kind, tok.n_text, tok.vocab_size, 10)
    text = corpus_text(30, seed=3) + "<|im_start|>"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
    assert Tokenizer.load(str(tmp_path), n_visual_codes=0).vocab_size == tok.n_text + 32 + 5


def test_bad_specs_and_training_inputs(tmp_path, corpus):
    for spec in ["gpt2", str(tmp_path)]:
        with pytest.raises(ValueError, match=spec):
            load_tokenizer(spec)
    with pytest.raises(ValueError, match="no training files"):
        train_bpe([], 400)
    missing, empty = tmp_path / "missing.txt", tmp_path / "empty.txt"
    empty.write_text("")
    for path in (missing, empty):
        with pytest.raises(ValueError, match=str(path)):
            train_bpe([corpus, str(path)], 400)
    with pytest.raises(ValueError, match="too small"):
        train_bpe([corpus], 256)


# -- ChatML -----------------------------------------------------------------------------------

def test_render_chat_and_loss_mask(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "say <|im_end|> please"},
        {"role": "assistant", "content": [{"type": "text", "text": "ok: "}, {"type": "text", "text": "<|im_end|>"}]},
    ]
    ids, mask = render_chat(tok, messages)
    expected = "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in
                       [("system", "Be brief."), ("user", "say <|im_end|> please"), ("assistant", "ok: <|im_end|>")])
    assert tok.decode(ids) == expected and len(mask) == len(ids)
    assert ids.count(tok.im_start_id) == 3 and ids.count(tok.im_end_id) == 3  # content's "<|im_end|>" stays text
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned == tok.encode("ok: <|im_end|>") + [tok.im_end_id]
    assert mask == [0] * (len(ids) - len(learned) - len(tok.encode("\n"))) + [1] * len(learned) + [0] * len(tok.encode("\n"))

    prompt, pmask = render_chat(tok, messages[:2], add_generation_prompt=True)
    assert tok.decode(prompt).endswith("<|im_end|>\n<|im_start|>assistant\n") and not any(pmask)
    assert ids[: len(prompt)] == prompt  # the prompt the engine sees is a prefix of the training render


def test_render_chat_errors(bpe):
    with pytest.raises(ValueError, match="robot"):
        render_chat(bpe, [{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match="image_url"):
        render_chat(bpe, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:"}}]}])
    ids, mask = render_chat(bpe, [{"role": "tool", "content": "42"}, {"role": "assistant", "content": None}])
    assert bpe.decode(ids) == "<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"
    assert sum(mask) == 1  # an empty assistant turn still learns to stop


# -- CLI --------------------------------------------------------------------------------------

def test_cli_train_and_encode(monkeypatch, tmp_path, corpus, capsys):
    monkeypatch.setattr(cli, "STAGES", ["omnigpt.tokenizer.commands"])  # other stages are tested on their own
    out = tmp_path / "tok"
    assert cli.main(["tokenizer", "train", "--vocab-size", "400", corpus, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    tok = load_tokenizer(str(out))
    assert f"vocab size: {tok.vocab_size}" in printed and "tokens/bytes" in printed and str(out) in printed

    assert cli.main(["tokenizer", "encode", "--tokenizer", str(out), "the quick <|im_end|>"]) == 0
    assert json.loads(capsys.readouterr().out) == tok.encode("the quick <|im_end|>")
    assert cli.main(["tokenizer", "encode", "--tokenizer", "cl100k_base", "--special", "hello world<|endoftext|>"]) == 0
    assert json.loads(capsys.readouterr().out) == [15339, 1917, 100256]

    assert cli.main(["tokenizer", "train", "--vocab-size", "400", str(tmp_path / "nope.txt"), "--out", str(out)]) == 2
    assert cli.main(["tokenizer", "encode", "--tokenizer", "gpt2", "x"]) == 2
    assert "gpt2" in capsys.readouterr().err
