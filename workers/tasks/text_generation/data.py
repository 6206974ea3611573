"""Reads text generation data: one JSON object per line, in one of three formats found from the file's first record
and held to on every line (chat conversations as OpenAI's fine-tuning API takes them, prompt/completion pairs, or
plain text). Every problem names the file and line, as for the other tasks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuneforge.workers.core.errors import InvalidDataset
from tuneforge.workers.core.text_data import checked_records
from tuneforge.workers.messages import DataFile

ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 200
"""Turns one conversation may have."""


@dataclass(frozen=True)
class Segment:
    """A stretch of an example's text, and whether the model learns to write it."""

    text: str
    trained: bool


@dataclass(frozen=True)
class Conversation:
    """A chat: (role, content, trained) turns; the chat template renders them."""

    line: int
    turns: tuple[tuple[str, str, bool], ...]


@dataclass(frozen=True)
class Plain:
    """A prompt and its completion (the prompt may be empty: plain text is one trained segment)."""

    line: int
    segments: tuple[Segment, ...]


Example = Conversation | Plain
FORMATS = {
    "chat": "`messages` (a list of {role, content})",
    "prompt_completion": "`prompt` and `completion`",
    "text": "`text`",
}


def detect_format(record: dict[str, Any]) -> str | None:
    if "messages" in record:
        return "chat"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


def read_examples(file: DataFile) -> tuple[str, list[Example]]:
    """The file's format (from its first record) and its examples; InvalidDataset naming the first few bad lines."""
    found: list[str] = []

    def check(number: int, record: dict[str, Any]) -> tuple[str, Example | None]:
        if not found:
            detected = detect_format(record)
            if detected is None:
                keys = ", ".join(sorted(record)[:5]) or "none"
                raise InvalidDataset(
                    f"{file.filename} line {number}: not a text generation record (its keys: {keys}); give "
                    f"{', or '.join(FORMATS.values())} on every line"
                )
            found.append(detected)
        return _check(found[0], number, record)

    examples: list[Example] = checked_records(file, check)
    return found[0], examples


def _check(found: str, number: int, record: dict[str, Any]) -> tuple[str, Example | None]:
    if detect_format(record) != found:
        return f"the file is in the {found} format (from its first line): this line needs {FORMATS[found]}", None
    if found == "chat":
        return _conversation(number, record["messages"])
    if found == "prompt_completion":
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            return "`prompt` must be a string and `completion` a non-empty string", None
        return "", Plain(number, (Segment(prompt, False), Segment(completion, True)))
    text = record["text"]
    if not isinstance(text, str) or not text.strip():
        return "`text` must be a non-empty string", None
    return "", Plain(number, (Segment(text, True),))


def _conversation(number: int, messages: Any) -> tuple[str, Conversation | None]:
    if not isinstance(messages, list) or not messages:
        return "`messages` must be a non-empty list", None
    if len(messages) > MAX_MESSAGES:
        return f"{len(messages)} messages, more than the limit of {MAX_MESSAGES}", None
    turns: list[tuple[str, str, bool]] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            return f"{where} must be an object with `role` and `content`", None
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", None
        if not isinstance(content, str):
            return f"{where}.content must be a string", None
        weight = message.get("weight", 1)
        if "weight" in message and (role != "assistant" or weight not in (0, 1) or isinstance(weight, bool)):
            return f"{where}.weight must be 0 or 1, and only on assistant messages", None
        turns.append((role, content, role == "assistant" and weight == 1))
    if not any(trained for _, _, trained in turns):
        return "no assistant message to learn from (every one has weight 0, or there is none)", None
    return "", Conversation(number, tuple(turns))
