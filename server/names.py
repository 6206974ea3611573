"""Resource names (`files/{file}`, `jobs/{job}`) and new ids."""

from __future__ import annotations

import re
import secrets

from tuneforge.server.errors import FieldViolation, invalid_argument

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def new_id(prefix: str) -> str:
    """A random, URL-safe, lower-case id such as `ft-5k2m9x0q3a7b`."""
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
    return prefix + "-" + "".join(secrets.choice(alphabet) for _ in range(12))


def parse_name(name: str, collection: str, field: str = "name") -> str:
    """Returns the id in `{collection}/{id}`; INVALID_ARGUMENT when the name is malformed."""
    head, _, resource_id = name.partition("/")
    if not name:
        raise invalid_argument([FieldViolation(field, f"required: a {collection}/{{id}} name")])
    if head != collection or not ID_PATTERN.fullmatch(resource_id):
        raise invalid_argument([FieldViolation(field, f"{name!r} is not a {collection}/{{id}} name")])
    return resource_id


def file_name(file_id: str) -> str:
    return f"files/{file_id}"


def job_name(job_id: str) -> str:
    return f"jobs/{job_id}"
