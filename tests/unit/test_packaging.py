"""The installed package pollutes nobody's imports: the wheel holds one top-level name, `tuneforge`, with the
server, workers and client beneath it (from the owner's folders, through the links in protos/tuneforge), and the
`tuneforge` command points into it. Nothing in the test session imports the folders by their bare names."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("server", "workers", "clients")
SKIPPED = (".venv", ".git", "build", "data", ".mypy_cache", ".ruff_cache", ".pytest_cache", "__pycache__")


def test_the_wheel_has_one_top_level_name_and_every_module(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*SKIPPED, "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("tuneforge-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/RECORD"))
        top_level = archive.read(f"{info}/top_level.txt").decode().split()
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    assert {name.split("/")[0] for name in names} == {"tuneforge", info}
    assert top_level == ["tuneforge"]
    assert "tuneforge = tuneforge.clients.cli:main" in entry_points
    expected = {
        f"tuneforge/{path.relative_to(ROOT)}"
        for folder in FOLDERS
        for path in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    expected |= {f"tuneforge/v1/{path.name}" for path in (ROOT / "protos/tuneforge/v1").glob("*_pb2*.py")}
    assert expected - set(names) == set()


def test_the_namespace_is_the_folders() -> None:
    import tuneforge.clients.cli
    import tuneforge.server.main
    import tuneforge.workers.spec

    for module, folder in (
        (tuneforge.server.main, "server"),
        (tuneforge.workers.spec, "workers"),
        (tuneforge.clients.cli, "clients"),
    ):
        assert Path(module.__file__ or "").resolve().parent == ROOT / folder
    assert not set(FOLDERS) & {name.split(".")[0] for name in sys.modules}, "a bare `server`/`workers`/`clients`"
