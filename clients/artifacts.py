"""What a user does with a downloaded artifact without the training stack: check its manifest, take out its report."""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"
REPORT = "report.html"


@dataclass
class Verification:
    """The outcome of checking an artifact against its manifest."""

    checked: int = 0
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.checked > 0 and not (self.mismatched or self.missing or self.unlisted)


def verify_artifact(archive: Path) -> Verification:
    """Recomputes every file's SHA-256 and compares it with the manifest; files it does not list count too."""
    result = Verification()
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        if MANIFEST not in members:
            result.missing.append(MANIFEST)
            return result
        manifest_file = tar.extractfile(members[MANIFEST])
        assert manifest_file is not None
        listed: dict[str, str] = json.loads(manifest_file.read())["files"]
        for name, expected in sorted(listed.items()):
            if name not in members:
                result.missing.append(name)
                continue
            handle = tar.extractfile(members[name])
            assert handle is not None
            digest = hashlib.file_digest(handle, "sha256")  # type: ignore[arg-type]  # ExFileObject reads
            result.checked += 1
            if digest.hexdigest() != expected:
                result.mismatched.append(name)
        result.unlisted = sorted(set(members) - set(listed) - {MANIFEST})
    return result


def read_member(archive: Path, name: str) -> bytes:
    """One file of the artifact (the report, the manifest); KeyError when it has none."""
    with tarfile.open(archive) as tar:
        handle = tar.extractfile(tar.getmember(name))
        if handle is None:
            raise KeyError(name)
        return handle.read()
