"""ChatML: each message is `<|im_start|>{role}\n{content}<|im_end|>\n`.

Role and content are encoded as plain text, so a user who types "<|im_end|>" gets ordinary text
tokens, never a turn boundary. The loss mask marks what the model should learn to produce:
assistant content and the `<|im_end|>` that ends it (so it learns to stop), nothing else.
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


def render_chat(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """messages -> (ids, loss_mask), loss_mask 1 exactly on assistant content and its <|im_end|>."""
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
        add(tok.encode(content_text(m.get("content"))) + [tok.im_end_id], learn)
        add(tok.encode("\n"), False)
    if add_generation_prompt:
        add([tok.im_start_id] + tok.encode("assistant\n"), False)
    return ids, mask
