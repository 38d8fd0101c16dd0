"""What an evaluation asks of a model, behind one interface, for a local checkpoint or an OpenAI-compatible server.

    lm.loglikelihood([(context, continuation), ...]) -> [sum of log p(continuation tokens | context), ...]
    lm.generate([prompt, ...], max_tokens, stop)      -> [completion text, ...]  (greedy unless temperature > 0)

`LocalLM` runs an omnigpt Transformer with its tokenizer. Every context starts with the end-of-text token, which
is what precedes a document in pretraining (omnigpt.data.packing: the EOT that ends one document is the first
input of the next). `ApiLM` calls `/v1/completions` with `echo` and `logprobs` for log-likelihoods (the server
scores prompt tokens, as vLLM and the OpenAI legacy API do) and `/v1/chat/completions` (or `/v1/completions`
with `chat=False`) for generation.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F


# ---- local checkpoint ------------------------------------------------------------------------------------------
def find_tokenizer_dir(model_dir: Path) -> Path | None:
    """A checkpoint's tokenizer: `tokenizer/` beside the weights, or up to three folders above (a trainer
    checkpoint lives at RUN/checkpoints/step_N; a corpus keeps its tokenizer in CORPUS/tokenizer)."""
    for d in [model_dir, *list(model_dir.resolve().parents)[:3]]:
        if (d / "tokenizer").is_dir():
            return d / "tokenizer"
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A model folder (config.json + model.safetensors), a trainer run folder, or its checkpoints/ folder."""
    p = Path(path)
    for cand in (p, p / "checkpoints"):
        latest = cand / "latest"
        if latest.is_file():
            return cand / latest.read_text().strip()
    return p


class LocalLM:
    def __init__(self, model, tokenizer, *, batch_size: int = 16, device: str | torch.device | None = None):
        self.model = model.eval()
        self.tok = tokenizer
        self.batch_size = batch_size
        self.device = device or model.head_weight().device
        self.bos = [int(tokenizer.eot_id)]
        self.max_len = model.cfg.max_seq_len

    @classmethod
    def load(cls, path: str | Path, tokenizer: str | None = None, device: str | None = None, **kw) -> "LocalLM":
        from omnigpt.model.weights import load_model
        from omnigpt.tokenizer.text import load_tokenizer

        ckpt = resolve_checkpoint(path)
        spec = tokenizer or find_tokenizer_dir(ckpt)
        if spec is None:
            raise FileNotFoundError(f"{path}: no tokenizer/ folder beside the checkpoint or above it; pass --tokenizer")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        from omnigpt.model.multimodal import CONFIG_KEY as VLM_CONFIG_KEY, load_vlm
        from omnigpt.model.weights import read_config

        if VLM_CONFIG_KEY in read_config(ckpt):  # a vision-language model: text tasks run on its LM, vqa on all of it
            vlm = load_vlm(ckpt, device=device).eval()
            lm = cls(vlm.lm, load_tokenizer(str(spec)), device=device, **kw)
            lm.vlm = vlm
            return lm
        return cls(load_model(ckpt, device=device), load_tokenizer(str(spec)), device=device, **kw)

    @property
    def name(self) -> str:
        return f"local:{getattr(self.tok, 'name', 'tokenizer')}"

    @torch.no_grad()
    def token_logprobs(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        """For each token sequence, log p(token t | tokens < t) for t = 1..len-1 (float32, on CPU)."""
        out: list[torch.Tensor] = [None] * len(seqs)  # type: ignore[list-item]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # similar lengths share a batch
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            T = max(len(seqs[i]) for i in idx)
            x = torch.zeros(len(idx), T, dtype=torch.long)
            for r, i in enumerate(idx):
                x[r, : len(seqs[i])] = torch.tensor(seqs[i])
            x = x.to(self.device)
            logp = F.log_softmax(self.model(x).logits.float(), dim=-1)  # right padding: causal, pads never seen
            got = logp[:, :-1].gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1).cpu()
            for r, i in enumerate(idx):
                out[i] = got[r, : len(seqs[i]) - 1]
        return out

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[float]:
        seqs, n_cont = [], []
        for context, cont in pairs:
            ctx, cnt = self.tok.encode(context), self.tok.encode(cont)
            ids = (self.bos + ctx + cnt)[-self.max_len :]  # keep the end: the continuation is what we score
            seqs.append(ids)
            n_cont.append(min(len(cnt), len(ids) - 1))
        lps = self.token_logprobs(seqs)
        return [float(lp[len(lp) - n :].sum()) if n else 0.0 for lp, n in zip(lps, n_cont)]

    def _decode(self, ids: list[int]) -> str:
        """Text of generated ids; ids past the tokenizer's vocabulary (rows padding the embedding) are dropped."""
        n = getattr(self.tok, "vocab_size", None)
        return self.tok.decode([i for i in ids if n is None or i < n])

    def generate(self, prompts: list[str], max_tokens: int = 64, stop: list[str] | tuple[str, ...] = (),
                 temperature: float = 0.0, seed: int | None = None) -> list[str]:
        from omnigpt.infer.generate import generate
        from omnigpt.infer.sampling import SamplingParams

        outs = []
        max_new = min(max_tokens, self.max_len // 2)  # a short-context model keeps half its window for the prompt
        for s in range(0, len(prompts), self.batch_size):
            chunk = prompts[s : s + self.batch_size]
            ids = [(self.bos + self.tok.encode(p))[-(self.max_len - max_new):] for p in chunk]
            params = [SamplingParams(temperature=temperature, max_new_tokens=max_new, stop=tuple(stop),
                                     seed=None if seed is None else seed + s + j) for j in range(len(chunk))]
            gens = generate(self.model, ids, params, eos_ids=(int(self.tok.eot_id),), decode=self._decode)
            outs += [g.text or "" for g in gens]
        return outs


# ---- OpenAI-compatible server ----------------------------------------------------------------------------------
class ApiError(RuntimeError):
    pass


class ApiLM:
    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, *, chat: bool = True,
                 timeout: float = 120.0):
        self.base = base_url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.model = model
        self.api_key = api_key
        self.chat = chat
        self.timeout = timeout

    @property
    def name(self) -> str:
        return f"api:{self.base}" + (f" ({self.model})" if self.model else "")

    def _request(self, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})}
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method="GET" if body is None else "POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise ApiError(f"{self.base + path}: HTTP {e.code}: {e.read()[:300].decode(errors='replace')}") from None
        except urllib.error.URLError as e:
            raise ApiError(f"{self.base + path}: {e.reason}") from None

    def _post(self, path: str, body: dict) -> dict:
        if self.model is None:  # the server's first model, as `GET /v1/models` lists them
            try:
                models = self._request("/models").get("data") or []
            except ApiError:
                models = []
            self.model = models[0]["id"] if models else ""
        return self._request(path, {"model": self.model, **body} if self.model else body)

    def _echo_logprobs(self, text: str) -> tuple[list[float | None], list[int]]:
        """Per-token log-probabilities of `text` as the server tokenizes it, and each token's character offset."""
        for max_tokens in (0, 1):  # some servers refuse max_tokens=0; then the one generated token is ignored
            try:
                res = self._post("/completions", {"prompt": text, "max_tokens": max_tokens, "echo": True, "logprobs": 1,
                                                  "temperature": 0.0})
                break
            except ApiError:
                if max_tokens == 1:
                    raise
        lp = res["choices"][0].get("logprobs") or {}
        if "token_logprobs" not in lp or "text_offset" not in lp:
            raise ApiError(f"{self.base}/completions: no echoed token_logprobs/text_offset; the server must support "
                           "echo=true with logprobs for log-likelihood tasks")
        return lp["token_logprobs"], lp["text_offset"]

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[float]:
        out = []
        for context, cont in pairs:
            full = context + cont
            lps, offs = self._echo_logprobs(full)
            # Tokens that start inside the continuation (a token straddling the boundary counts with the context).
            out.append(float(sum(lp for lp, o in zip(lps, offs) if o >= len(context) and o < len(full) and lp is not None)))
        return out

    def text_logprob(self, text: str) -> tuple[float, int]:
        """(sum of log p over the tokens after the first, number of those tokens) for a whole text."""
        lps, offs = self._echo_logprobs(text)
        vals = [lp for lp, o in zip(lps, offs) if lp is not None and o < len(text)]
        return float(sum(vals)), len(vals)

    def generate(self, prompts: list[str | list[dict]], max_tokens: int = 64, stop: list[str] | tuple[str, ...] = (),
                 temperature: float = 0.0, seed: int | None = None) -> list[str]:
        """One completion per prompt. With chat, a prompt may also be a list of content parts (text, image_url)."""
        if not self.chat and any(not isinstance(p, str) for p in prompts):
            raise ValueError("content parts (images) need chat completions, not --completions")
        outs = []
        for i, p in enumerate(prompts):
            body = {"max_tokens": max_tokens, "temperature": temperature, **({"stop": list(stop)[:4]} if stop else {}),
                    **({"seed": seed + i} if seed is not None else {})}
            if self.chat:
                res = self._post("/chat/completions", {"messages": [{"role": "user", "content": p}], **body})
                text = res["choices"][0]["message"].get("content") or ""
            else:
                res = self._post("/completions", {"prompt": p, **body})
                text = res["choices"][0].get("text") or ""
            for s in stop:  # servers may return the text past a stop string when they ignore `stop`
                if s and s in text:
                    text = text[: text.index(s)]
            outs.append(text)
        return outs


def nats_to_bits(x: float) -> float:
    return x / math.log(2)
