"""`omnigpt chat`: a terminal chat client for any OpenAI-compatible server, streaming the answer as it comes.

Standard library only (urllib), so it runs wherever omnigpt is installed. Type a message and press Enter;
/image PATH attaches a local image file to the next message (sent inline as a data URL, after the text, as the
web page sends it), /reset forgets the conversation, /system TEXT sets the system prompt, /exit (or Ctrl-D) quits.
"""

from __future__ import annotations

import base64
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator


class ChatError(Exception):
    pass


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600):
        self.base_url = base_url.rstrip("/")
        self.api_key, self.timeout = api_key, timeout

    def _open(self, path: str, body: dict | None = None):
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers, method="POST" if data else "GET")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise ChatError(f"{e.code}: {_error_message(e.read())}") from None
        except urllib.error.URLError as e:
            raise ChatError(f"cannot reach {self.base_url}: {e.reason}") from None

    def models(self) -> list[str]:
        with self._open("/models") as r:
            return [m["id"] for m in json.load(r)["data"]]

    def stream_chat(self, body: dict) -> Iterator[str]:
        """Text deltas of a streamed chat completion."""
        with self._open("/chat/completions", {**body, "stream": True}) as r:
            for raw in r:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise ChatError(event["error"].get("message", "error"))
                for choice in event.get("choices", []):
                    text = choice.get("delta", {}).get("content")
                    if text:
                        yield text


IMAGE_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
                    (b"GIF89a", "image/gif"))


def image_data_url(path: str) -> str:
    """A local PNG, JPEG, GIF or WebP file as a data URL (recognised by its bytes, not its name)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ChatError(f"cannot read {path}: {e.strerror or e}") from None
    mime = next((m for sig, m in IMAGE_SIGNATURES if data.startswith(sig)), None)
    if mime is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    if mime is None:
        raise ChatError(f"{path} is not a PNG, JPEG, GIF or WebP image")
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _error_message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:200]


def run_chat(base_url: str, model: str | None, api_key: str | None, system: str | None = None,
             temperature: float | None = None, max_tokens: int | None = None, seed: int | None = None,
             images: list[str] = (), stdin=None, stdout=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    client = Client(base_url, api_key)
    try:
        attached = [image_data_url(path) for path in images]  # data URLs for the next message
        model = model or client.models()[0]
    except (ChatError, IndexError) as e:
        print(f"omnigpt chat: {e or 'the server lists no models'}", file=sys.stderr)
        return 2
    interactive = stdin.isatty()
    print(f"chatting with {model} at {base_url}  (/image PATH, /reset, /system TEXT, /exit)", file=stdout)
    messages: list[dict] = []
    for path in images:
        print(f"(image attached: {path}; it goes with the first message)", file=stdout)
    while True:
        if interactive:
            print("\n> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            return 0
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            messages, attached = [], []
            print("(conversation cleared)", file=stdout)
            continue
        if text.strip() == "/image" or text.startswith("/image "):
            path = text[len("/image"):].strip()
            try:
                if not path:
                    raise ChatError("usage: /image PATH")
                attached.append(image_data_url(path))
                print(f"(image attached: {path}; it goes with the next message)", file=stdout)
            except ChatError as e:
                print(f"({e})", file=stdout)
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            print(f"(system prompt {'set' if system else 'cleared'})", file=stdout)
            continue
        content = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in attached]
        messages.append({"role": "user", "content": content if attached else text})
        body = {"model": model, "messages": ([{"role": "system", "content": system}] if system else []) + messages}
        for key, value in (("temperature", temperature), ("max_tokens", max_tokens), ("seed", seed)):
            if value is not None:
                body[key] = value
        answer = []
        try:
            for delta in client.stream_chat(body):
                answer.append(delta)
                print(delta, end="", file=stdout, flush=True)
        except ChatError as e:
            print(f"\n[error] {e}", file=stdout)
            messages.pop()  # the refused message is not part of the conversation, nor are its images
            if attached:
                print(f"({len(attached)} attached image(s) dropped)", file=stdout)
                attached.clear()
            continue
        except KeyboardInterrupt:
            print("\n[interrupted]", file=stdout)
        print(file=stdout, flush=True)
        attached.clear()
        messages.append({"role": "assistant", "content": "".join(answer)})
