"""What a worker may be made to unpack or decode: archives made the ordinary way are accepted, archive bombs are
refused over the whole archive before anything is written, and images and clips are refused from their headers
before their pixels or samples are decoded (training and Predict use the same functions)."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tests.media import blank_png, write_tar
from tuneforge.workers.core import archives, input_limits
from tuneforge.workers.core.archives import ArchiveLimits, archive_limits, extract_archive
from tuneforge.workers.core.errors import InvalidDataset, JobFailure
from tuneforge.workers.core.input_limits import check_image, read_audio, read_image
from tuneforge.workers.messages import DataFile, RunJob
from tuneforge.workers.spec import DataSettings, TrainingSpec


def test_an_archive_of_dot_is_accepted(tmp_path: Path) -> None:
    """`tar -C dir -czf x.tgz .` starts with the member `.` (and `./name` after it)."""
    folder = tmp_path / "data"
    for colour in ("red", "blue"):
        (folder / colour).mkdir(parents=True)
        (folder / colour / "a.png").write_bytes(colour.encode())
    archive = tmp_path / "dot.tar.gz"
    subprocess.run(["tar", "-C", str(folder), "-czf", str(archive), "."], check=True)
    with tarfile.open(archive) as tar:
        assert tar.getnames()[0] == "."
    root = extract_archive(DataFile(str(archive), "dot.tar.gz"), tmp_path / "out")
    assert (root / "red" / "a.png").read_bytes() == b"red" and (root / "blue" / "a.png").read_bytes() == b"blue"


def test_a_tar_gz_bomb_is_refused_by_its_ratio_before_unpacking(tmp_path: Path) -> None:
    bomb = write_tar(tmp_path / "bomb.tar.gz", {"red/zeros.png": b"\0" * (32 << 20)})
    assert bomb.stat().st_size < 100_000
    with pytest.raises(InvalidDataset, match=r"unpacks to 33,554,432 bytes, \d[\d,]* times its .* which looks like"):
        extract_archive(DataFile(str(bomb), "bomb.tar.gz"), tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == [], "nothing was unpacked"
    small = write_tar(tmp_path / "small.tar.gz", {"red/zeros.png": b"\0" * 500_000})  # cannot fill a disk
    extract_archive(DataFile(str(small), "small.tar.gz"), tmp_path / "small")


def test_the_unpacked_cap_follows_the_job_and_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = RunJob(
        "ft-1",
        1,
        TrainingSpec("image_classification", "m", DataSettings("files/x")),
        DataFile("x", "x"),
        None,
        "w",
        "c",
        "a",
        max_unpacked_bytes=1000,
    )
    assert archive_limits(job).max_unpacked_bytes == 1000
    plain = write_tar(tmp_path / "plain.tar", {"red/a.png": b"x" * 2000})
    with pytest.raises(InvalidDataset, match="unpacks to 2,000 bytes, more than the limit of 1,000"):
        extract_archive(DataFile(str(plain), "plain.tar"), tmp_path / "out", archive_limits(job))
    free = shutil.disk_usage(tmp_path).free  # other tests may free space meanwhile: the margin absorbs it
    monkeypatch.setattr(archives, "DISK_RESERVE_BYTES", free + (64 << 30))  # as if the disk were nearly full
    with pytest.raises(JobFailure, match="the worker's disk has") as failure:
        extract_archive(DataFile(str(plain), "plain.tar"), tmp_path / "out2", ArchiveLimits())
    assert failure.value.reason == "DISK_FULL"


def test_an_image_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    bomb = blank_png(13000, 13700)
    assert len(bomb) < 100_000
    message = r"the image is 13000 x 13700 = 178,100,000 pixels, more than the limit of 50,000,000"
    with pytest.raises(InvalidDataset, match=message):
        read_image(bomb, "the image")
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    with pytest.raises(InvalidDataset, match=message):
        check_image(path, "the image")
    assert read_image(blank_png(64, 48), "a small one").size == (64, 48)


def wav_of(seconds: float, channels: int = 1, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros((int(seconds * rate), channels), dtype="float32"), rate, format="WAV")
    return buffer.getvalue()


def test_clips_are_refused_from_their_header(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(input_limits, "MAX_AUDIO_SAMPLES", 16000)  # one second, so the test clip stays small
    samples, rate = read_audio(wav_of(0.5), "the clip")
    assert (samples.shape, rate) == ((8000, 1), 16000)
    with pytest.raises(InvalidDataset, match="more than the limit of 16,000 samples"):
        read_audio(wav_of(2.0), "the clip")
    with pytest.raises(InvalidDataset, match="more than the limit of 16,000 samples"):
        read_audio(wav_of(0.75, channels=2), "the clip")  # channels count: 24,000 samples
    with pytest.raises(InvalidDataset, match="sample rate 2000 Hz is outside"):
        read_audio(wav_of(0.1, rate=2000), "the clip")
    with pytest.raises(InvalidDataset, match="17 channels; at most 16"):
        read_audio(wav_of(0.01, channels=17), "the clip")
