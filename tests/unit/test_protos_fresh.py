"""The committed stubs are exactly what `make protos` generates from the committed .proto files."""

from __future__ import annotations

import filecmp
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "protos"))

from generate import PACKAGE_DIR, generate  # noqa: E402


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert fresh, "protoc generated nothing"
    committed = sorted(PACKAGE_DIR.glob("*_pb2*.py*"))
    assert [p.name for p in fresh] == [p.name for p in committed], "stub files differ: run `make protos`"
    stale = [p.name for p in fresh if not filecmp.cmp(p, PACKAGE_DIR / p.name, shallow=False)]
    assert not stale, f"stale generated stubs {stale}: run `make protos` and commit the result"
