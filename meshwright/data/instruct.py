"""Instruction / chat data for fine-tuning: jsonl lines of ``{"prompt", "response"}`` or ``{"messages": [...]}``
rendered into segments, each marked trainable or not, so the loss sees only the responses.

Rendering (no model-specific template is guessed): a prompt/response pair is ``prompt`` then ``response``
then the end-of-text token; a conversation is, per message, a header ``<|role|>\\n`` (never trained) and
``content\\n`` (trained for ``assistant`` messages), then the end-of-text token (trained when the last
message is the assistant's, so the model learns to stop). Put a model's own chat markup in the text if it
needs one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from meshwright.data.jsonl import iter_jsonl
from meshwright.errors import ConfigError

Segment = tuple[str, bool]  # (text, trained)
ROLES = ("system", "user", "assistant", "tool")


def render(obj: object, where: str) -> list[Segment]:
    """One jsonl object -> segments; a malformed line is a one-line error naming its place."""
    if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
        return [(obj["prompt"], False), (obj["response"], True)]
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list) and obj["messages"]:
        out: list[Segment] = []
        for i, msg in enumerate(obj["messages"]):
            if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
                raise ConfigError(f"{where} messages[{i}]={msg!r} is invalid; valid: {{\"role\": one of "
                                  f"{', '.join(ROLES)}, \"content\": \"...\"}}")
            out.append((f"<|{msg['role']}|>\n", False))
            out.append((msg["content"] + "\n", msg["role"] == "assistant"))
        return out
    raise ConfigError(f"{where} is invalid; valid: an object with string fields prompt and response, or a non-empty "
                      f"messages list")


def iter_examples(path: Path) -> Iterator[list[Segment]]:
    for lineno, obj in iter_jsonl(path):
        yield render(obj, f"{path}:{lineno}")


def encode_example(segments: list[Segment], tok) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (ending with the end-of-text token) and a 0/1 mask: 1 where the token is a loss target."""
    ids: list[int] = []
    mask: list[int] = []
    for text, trained in segments:
        part = tok.encode(text)
        ids.extend(part)
        mask.extend([int(trained)] * len(part))
    ids.append(tok.eos_id)
    mask.append(int(segments[-1][1]))
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)


def looks_instruct(path: Path) -> bool:
    """Whether a .jsonl file's first object is an instruction/chat example."""
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(obj, dict) and ("messages" in obj or ("prompt" in obj and "response" in obj))
    return False
