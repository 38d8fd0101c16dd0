"""`omnigpt chat`: a terminal chat client for any OpenAI-compatible server, streaming the answer as it comes.

Standard library only (urllib), so it runs wherever omnigpt is installed. Type a message and press Enter;
/reset forgets the conversation, /system TEXT sets the system prompt, /exit (or Ctrl-D) quits.
"""

from __future__ import annotations

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


def _error_message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:200]


def run_chat(base_url: str, model: str | None, api_key: str | None, system: str | None = None,
             temperature: float | None = None, max_tokens: int | None = None, seed: int | None = None,
             stdin=None, stdout=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    client = Client(base_url, api_key)
    try:
        model = model or client.models()[0]
    except (ChatError, IndexError) as e:
        print(f"omnigpt chat: {e or 'the server lists no models'}", file=sys.stderr)
        return 2
    interactive = stdin.isatty()
    print(f"chatting with {model} at {base_url}  (/reset, /system TEXT, /exit)", file=stdout)
    messages: list[dict] = []
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
            messages = []
            print("(conversation cleared)", file=stdout)
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            print(f"(system prompt {'set' if system else 'cleared'})", file=stdout)
            continue
        messages.append({"role": "user", "content": text})
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
            messages.pop()
            continue
        except KeyboardInterrupt:
            print("\n[interrupted]", file=stdout)
        print(file=stdout, flush=True)
        messages.append({"role": "assistant", "content": "".join(answer)})
