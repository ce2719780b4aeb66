"""Training-data formats: detect one per file from its columns, normalise every row to chat.

Every accepted row becomes either a list of chat ``messages`` (``{"role", "content"}`` with roles
``system``/``user``/``assistant``) or, for causal-LM data, one ``text``. The detection is per file
and by column names, most specific first, so a file that happens to carry extra columns (ids,
categories) still resolves to one format:

=================  =======================================  ==========================================
format             columns                                  becomes
=================  =======================================  ==========================================
``messages``       ``messages`` (OpenAI style)              the messages as they are
``sharegpt``       ``conversations`` (``from``/``value``)   human→user, gpt→assistant, system→system
``alpaca``         ``instruction``, ``output`` [, input]    user: instruction + input, assistant: output
``prompt``         ``prompt``, ``completion``               user: prompt, assistant: completion
``text``           ``text``                                 plain text (causal LM)
=================  =======================================  ==========================================

A row is rejected (``BadRow``, carrying the reason) when it fits its file's format badly: a
missing or empty assistant turn, an unknown role, a non-string content part. The caller counts
these per file and row index and decides whether the share of bad rows is tolerable. Nested
columns stored as JSON strings (CSV files, Kaito's ``messages_column`` "in JSON format") are
decoded first. Pure Python, no heavy imports: the fetch step and ``kaiflow validate`` use it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

Kind = Literal["chat", "text"]
Message = dict[str, str]

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}
# (format name, the columns that must all be present), most specific first.
FORMATS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("alpaca", ("instruction", "output")),
    ("prompt", ("prompt", "completion")),
    ("text", ("text",)),
)
# Every column a format reads (required and optional): the readers skip the others.
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "input", "output"),
    "prompt": ("prompt", "completion"),
    "text": ("text",),
}
FORMAT_KIND: dict[str, Kind] = {"messages": "chat", "sharegpt": "chat", "alpaca": "chat", "prompt": "chat", "text": "text"}


class BadRow(ValueError):
    """One row does not fit its file's format; the message says why (without the row index)."""


class UnknownFormat(ValueError):
    """A file's columns fit none of the accepted formats."""


_COLUMN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_ .-]{0,63}$")
MAX_SHOWN_COLUMNS = 20


def shown_columns(columns: Iterable[str]) -> list[str]:
    """Column names for an error message, never the file's contents: a CSV's header line or a JSON
    object's keys are the data's first bytes, so a name that does not look like a column name is
    shown by its length only (a URL that answers with something other than a dataset stays unread)."""
    names = list(columns)
    shown = [n if isinstance(n, str) and _COLUMN_NAME.match(n) else f"<a {len(str(n))}-character name>"
             for n in names[:MAX_SHOWN_COLUMNS]]
    if len(names) > MAX_SHOWN_COLUMNS:
        shown.append(f"<{len(names) - MAX_SHOWN_COLUMNS} more>")
    return shown


def detect_format(columns: Iterable[str]) -> str:
    present = set(columns)
    for name, required in FORMATS:
        if all(c in present for c in required):
            return name
    expected = "; ".join(" + ".join(cols) for _, cols in FORMATS)
    raise UnknownFormat(f"columns {shown_columns(sorted(present))} fit no accepted format (expected one of: {expected})")


def normalise_row(fmt: str, row: Mapping[str, Any]) -> list[Message] | str:
    """The chat messages (chat formats) or the text (``text`` format) of one row."""
    if fmt == "messages":
        return _check_chat(_openai_messages(_decoded(row.get("messages"), "messages")))
    if fmt == "sharegpt":
        return _check_chat(_sharegpt_messages(_decoded(row.get("conversations"), "conversations")))
    if fmt == "alpaca":
        instruction = _text(row.get("instruction"), "instruction")
        extra = row.get("input")
        extra = _text(extra, "input") if extra not in (None, "") else ""
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return _check_chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row.get("output"), "output")}])
    if fmt == "prompt":
        prompt = _decoded(row.get("prompt"), "prompt")
        completion = _decoded(row.get("completion"), "completion")
        # trl's conversational prompt-completion rows carry message lists on both sides.
        head = _openai_messages(prompt) if isinstance(prompt, list) else [{"role": "user", "content": _text(prompt, "prompt")}]
        tail = (
            _openai_messages(completion)
            if isinstance(completion, list)
            else [{"role": "assistant", "content": _text(completion, "completion")}]
        )
        return _check_chat(head + tail)
    if fmt == "text":
        text = _text(row.get("text"), "text")
        if not text.strip():
            raise BadRow("empty text")
        return text
    raise ValueError(f"unknown format {fmt!r}")


def _decoded(value: Any, column: str) -> Any:
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadRow(f"column {column!r} holds invalid JSON ({exc.msg} at char {exc.pos})") from None
    return value


def _text(value: Any, column: str) -> str:
    if value is None:
        raise BadRow(f"column {column!r} is missing or null")
    if not isinstance(value, str):
        raise BadRow(f"column {column!r} must be a string, got {type(value).__name__}")
    return value


def _content(value: Any, where: str) -> str:
    """OpenAI content: a string, or a list of parts of which only text parts are accepted."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list):
        texts = []
        for part in value:
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise BadRow(f"{where}: content part of type {kind!r} is not text")
        return "".join(texts)
    raise BadRow(f"{where}: content must be a string, got {type(value).__name__}")


def _openai_messages(value: Any) -> list[Message]:
    if not isinstance(value, list):
        raise BadRow(f"'messages' must be a list of messages, got {type(value).__name__}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise BadRow(f"message {i} is not an object")
        role = message.get("role")
        if role not in ROLES:
            raise BadRow(f"message {i} has an unknown role (expected one of {', '.join(ROLES)})")
        messages.append({"role": role, "content": _content(message.get("content"), f"message {i}")})
    return messages


def _sharegpt_messages(value: Any) -> list[Message]:
    if not isinstance(value, list):
        raise BadRow(f"'conversations' must be a list of turns, got {type(value).__name__}")
    messages = []
    for i, turn in enumerate(value):
        if not isinstance(turn, Mapping):
            raise BadRow(f"turn {i} is not an object")
        speaker = turn.get("from")
        role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise BadRow(f"turn {i} has an unknown speaker 'from' (expected one of {', '.join(SHAREGPT_ROLES)})")
        messages.append({"role": role, "content": _content(turn.get("value"), f"turn {i}")})
    return messages


def _check_chat(messages: list[Message]) -> list[Message]:
    if not messages:
        raise BadRow("no messages")
    assistant_turns = 0
    for i, message in enumerate(messages):
        if not message["content"].strip():
            if message["role"] == "assistant":
                raise BadRow(f"message {i} is an empty assistant turn")
            if message["role"] == "user":
                raise BadRow(f"message {i} is an empty user turn")
        assistant_turns += message["role"] == "assistant"
    if not assistant_turns:
        raise BadRow("no assistant turn to learn from")
    return messages


def estimate_tokens(value: list[Message] | str) -> int:
    """A tokenizer-free estimate (≈4 characters per token for English BPE vocabularies)."""
    chars = len(value) if isinstance(value, str) else sum(len(m["content"]) + 8 for m in value)
    return max(1, round(chars / 4))
