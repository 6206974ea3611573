"""The resolved TrainingSpec as JSON and back, exactly: the server stores it with a job when the job is accepted, so
every attempt trains what was accepted, whatever the server's model roots or defaults are by then."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import MISSING
from enum import Enum
from typing import Any

from tuneforge.workers.spec import TrainingSpec


def spec_to_json(spec: TrainingSpec) -> str:
    return json.dumps(dataclasses.asdict(spec), sort_keys=True)


def spec_from_json(text: str) -> TrainingSpec:
    """The spec spec_to_json wrote, by this version or an older one (a field added since takes its default);
    ValueError when the text does not describe one (a required field missing, or one this version does not know)."""
    value = _build(TrainingSpec, json.loads(text))
    assert isinstance(value, TrainingSpec)
    return value


def _build(kind: Any, value: Any) -> Any:
    """`value` (decoded JSON) as an instance of the annotated type `kind`."""
    origin = typing.get_origin(kind)
    if origin in (types.UnionType, typing.Union):
        options = [option for option in typing.get_args(kind) if option is not type(None)]
        return None if value is None else _build(options[0], value)
    if origin is tuple:
        item = typing.get_args(kind)[0]
        return tuple(_build(item, element) for element in value)
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        if not isinstance(value, dict):
            raise ValueError(f"{kind.__name__}: expected an object, got {value!r}")
        hints = typing.get_type_hints(kind)
        fields = dataclasses.fields(kind)
        names = {f.name for f in fields}
        required = {f.name for f in fields if f.default is MISSING and f.default_factory is MISSING}
        if not required <= value.keys() <= names:
            raise ValueError(f"{kind.__name__}: fields {sorted(value)} are not {sorted(names)}")
        # A field added since the spec was stored takes its default, which is what that version did.
        return kind(**{name: _build(hints[name], value[name]) for name in value})
    if isinstance(kind, type) and issubclass(kind, Enum):
        return kind(value)
    if kind is float and isinstance(value, int):
        return float(value)
    return value
