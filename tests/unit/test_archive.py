"""Artifact extraction refuses links, escapes and absolute paths before writing anything."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from tuneforge.clients.archive import UnsafeArchive, extract_archive


def make_tar(path: Path, members: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w") as tar:
        for member in members:
            data = b"x" * member.size if member.isfile() else None
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    return path


def file_member(name: str) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.size = 3
    return member


def test_plain_archive_extracts(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "ok.tar", [file_member("config.json"), file_member("sub/model.safetensors")])
    names = extract_archive(archive, tmp_path / "out")
    assert names == ["config.json", "sub/model.safetensors"]
    assert (tmp_path / "out" / "sub" / "model.safetensors").read_bytes() == b"xxx"


@pytest.mark.parametrize("name", ["../evil", "/etc/evil", "a/../../evil"])
def test_escaping_paths_are_refused(tmp_path: Path, name: str) -> None:
    archive = make_tar(tmp_path / "bad.tar", [file_member("fine.txt"), file_member(name)])
    with pytest.raises(UnsafeArchive, match="outside"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "fine.txt").exists(), "nothing may be written from a refused archive"


def test_links_are_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    with pytest.raises(UnsafeArchive, match="not a regular file"):
        extract_archive(make_tar(tmp_path / "bad.tar", [link]), tmp_path / "out")
