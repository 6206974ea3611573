"""Reads preference pairs: one JSON object per line, a prompt (a text, or chat messages) with a chosen and a rejected
answer. Two layouts are taken: `{"prompt" or "messages", "chosen", "rejected"}` (TRL's, where `prompt` may itself be
messages and an answer may be a text, an assistant message or a list of them), and OpenAI's preference fine-tuning
format (`input.messages`, `preferred_output`, `non_preferred_output`). Every problem names the file and line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuneforge.workers.core.text_data import checked_records
from tuneforge.workers.messages import DataFile
from tuneforge.workers.tasks.text_generation.data import MAX_MESSAGES, ROLES

Messages = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Preference:
    """A prompt (text, or messages answered as the next assistant turn) and two answers, the first preferred."""

    line: int
    prompt: str | Messages
    chosen: str
    rejected: str


def read_preferences(file: DataFile) -> list[Preference]:
    """Every pair of the file; InvalidDataset naming the first few bad lines."""
    return checked_records(file, _check)


def _check(number: int, record: dict[str, Any]) -> tuple[str, Preference | None]:
    if "input" in record or "preferred_output" in record:
        given = record.get("input")
        if not isinstance(given, dict) or "messages" not in given:
            return "OpenAI's preference format needs `input` with `messages`", None
        prompt_value: Any = given["messages"]
        chosen_value, rejected_value = record.get("preferred_output"), record.get("non_preferred_output")
        names = ("preferred_output", "non_preferred_output")
    elif "chosen" in record and "rejected" in record:
        prompt_value = record["messages"] if "messages" in record else record.get("prompt")
        chosen_value, rejected_value = record["chosen"], record["rejected"]
        names = ("chosen", "rejected")
    else:
        keys = ", ".join(sorted(record)[:5]) or "none"
        return (
            f"not a preference pair (its keys: {keys}); give `prompt` or `messages` with `chosen` and `rejected`, "
            "or OpenAI's `input`, `preferred_output` and `non_preferred_output`",
            None,
        )
    problem, prompt = _prompt(prompt_value)
    if prompt is None:
        return problem, None
    chosen_problem, chosen = _answer(names[0], chosen_value)
    rejected_problem, rejected = _answer(names[1], rejected_value)
    if chosen is None or rejected is None:
        return chosen_problem or rejected_problem, None
    if chosen == rejected:
        return f"`{names[0]}` and `{names[1]}` are the same answer: the pair teaches nothing", None
    return "", Preference(number, prompt, chosen, rejected)


def _prompt(value: Any) -> tuple[str, str | Messages | None]:
    if isinstance(value, str):
        return ("", value) if value.strip() else ("the prompt is empty", None)
    if not isinstance(value, list) or not value:
        return "`prompt` (or `messages`) must be a non-empty string or list of {role, content}", None
    if len(value) > MAX_MESSAGES:
        return f"{len(value)} messages, more than the limit of {MAX_MESSAGES}", None
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"messages[{index}] must be an object with a `role` of {', '.join(ROLES)}", None
        if not isinstance(message.get("content"), str):
            return f"messages[{index}].content must be a string", None
        messages.append((str(message["role"]), str(message["content"])))
    if messages[-1][0] == "assistant":
        return "the prompt's last message is the assistant's: the answers to compare follow a user turn", None
    return "", tuple(messages)


def _answer(name: str, value: Any) -> tuple[str, str | None]:
    """An answer as a text: given as one, as an assistant message, or as a list holding one assistant message."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant":
            return f"`{name}` must be the assistant's answer, not a {value.get('role')!r} message", None
        value = value.get("content")
    if not isinstance(value, str) or not value.strip():
        return f"`{name}` must be a non-empty answer (a string or an assistant message)", None
    return "", value
