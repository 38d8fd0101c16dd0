"""ChatML: each message is `<|im_start|>{role}\n{content}<|im_end|>\n`.

Role and content are encoded as plain text, so a user who types "<|im_end|>" gets ordinary text
tokens, never a turn boundary. The loss mask marks what the model should learn to produce:
assistant content and the `<|im_end|>` that ends it (so it learns to stop), nothing else.

Images (`image_url` parts) need a vision model: with `image_tokens=n > 0` each becomes `<|image_start|>`,
n x `<|image|>`, `<|image_end|>` (never learned); the model splices the image's features at the placeholders.
`image_urls(messages)` lists the images in the order of their placeholders.
"""

from __future__ import annotations

from omnigpt.tokenizer.text import Tokenizer

ROLES = ("system", "user", "assistant", "tool")


def content_text(content) -> str:
    """OpenAI-style content (a string, or a list of typed parts) -> text. Only text parts for now."""
    if content is None:  # e.g. an assistant turn that only carried tool calls
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text":
            raise ValueError(f"unsupported content part type {kind!r} (only 'text' for now)")
        texts.append(part["text"])
    return "".join(texts)


def content_parts(content) -> list[tuple[str, str]]:
    """OpenAI-style content -> [("text", text) | ("image_url", url)] in order."""
    if content is None:
        return []
    if isinstance(content, str):
        return [("text", content)]
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind == "text":
            parts.append(("text", part["text"]))
        elif kind == "image_url":
            url = part.get("image_url")
            parts.append(("image_url", url.get("url", "") if isinstance(url, dict) else str(url)))
        else:
            raise ValueError(f"unsupported content part type {kind!r} (expected 'text' or 'image_url')")
    return parts


def merge_text(parts: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Join neighbouring text parts, so that text is encoded as one string whatever its split into parts."""
    out: list[tuple[str, str]] = []
    for kind, value in parts:
        if kind == "text" and out and out[-1][0] == "text":
            out[-1] = ("text", out[-1][1] + value)
        else:
            out.append((kind, value))
    return out


def image_urls(messages: list[dict]) -> list[str]:
    """Every image_url of the conversation, in the order render_chat places their placeholders."""
    return [url for m in messages for kind, url in content_parts(m.get("content")) if kind == "image_url"]


def render_chat(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = False,
                image_tokens: int = 0, images_first: bool = False) -> tuple[list[int], list[int]]:
    """messages -> (ids, loss_mask), loss_mask 1 exactly on assistant text and its <|im_end|>.

    image_tokens: `<|image|>` placeholders per image_url part; 0 (the default, a text-only model) refuses images.
    images_first: each message's images go before its text, in their order (a model trained so, whatever order a
    client sends: VLMConfig.image_first); the images keep their order in the conversation."""
    ids: list[int] = []
    mask: list[int] = []

    def add(new: list[int], learn: bool) -> None:
        ids.extend(new)
        mask.extend([int(learn)] * len(new))

    for m in messages:
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"bad chat role {role!r}: expected one of {', '.join(ROLES)}")
        learn = role == "assistant"
        add([tok.im_start_id] + tok.encode(f"{role}\n"), False)
        parts = content_parts(m.get("content"))
        if images_first:
            parts = sorted(parts, key=lambda part: part[0] != "image_url")  # stable: images, then text, each in order
        for kind, value in merge_text(parts):
            if kind == "text":
                add(tok.encode(value), learn)
            elif image_tokens <= 0:
                raise ValueError("image_url content parts need a vision model (render_chat image_tokens > 0)")
            else:
                add([tok.image_start_id] + [tok.image_id] * image_tokens + [tok.image_end_id], False)
        add([tok.im_end_id], learn)
        add(tok.encode("\n"), False)
    if add_generation_prompt:
        add([tok.im_start_id] + tok.encode("assistant\n"), False)
    return ids, mask
