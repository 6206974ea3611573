"""What a decoded input may cost, checked from its header before anything is decoded: the same limits for training
data, Predict inputs and export checks, so a 21 KB PNG cannot make a worker allocate gigabytes on any path.

Every refusal is an InvalidDataset naming the input, its size and the limit.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import soundfile
from PIL import Image, UnidentifiedImageError

from tuneforge.workers.core.errors import InvalidDataset

MAX_IMAGE_PIXELS = 50_000_000
"""Width x height of one image (about 150 MB once decoded to RGB): beyond any camera a data set needs."""
MAX_AUDIO_SAMPLES = 600 * 48_000
"""Frames x channels of one clip (ten minutes of mono 48 kHz, about 115 MB as float32)."""
MAX_AUDIO_CHANNELS = 16
MIN_SAMPLE_RATE = 4_000
MAX_SAMPLE_RATE = 384_000
IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)
AUDIO_ERRORS = (soundfile.LibsndfileError, RuntimeError, ValueError, TypeError)

Source = str | Path | bytes
"""A file's path, or its encoded bytes (Predict)."""


def _opened(source: Source) -> Any:
    return io.BytesIO(source) if isinstance(source, bytes) else str(source)


def _check_pixels(image: Image.Image, where: str) -> None:
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise InvalidDataset(
            f"{where}: the image is {width} x {height} = {width * height:,} pixels, more than the limit of "
            f"{MAX_IMAGE_PIXELS:,}; scale it down"
        )


def check_image(source: Source, where: str) -> None:
    """Reads the header and checks the file's integrity without decoding the pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the pixel limit here is lower
            with Image.open(_opened(source)) as image:
                _check_pixels(image, where)
                image.verify()
    except IMAGE_ERRORS as exc:
        raise InvalidDataset(f"{where}: not a readable image ({type(exc).__name__}: {exc})") from exc


def read_image(source: Source, where: str) -> Image.Image:
    """The image as RGB, its size checked from the header before the pixels are decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the pixel limit here is lower
            with Image.open(_opened(source)) as image:
                _check_pixels(image, where)
                return image.convert("RGB")
    except IMAGE_ERRORS as exc:
        raise InvalidDataset(f"{where}: not a readable image ({type(exc).__name__}: {exc})") from exc


def check_audio_header(source: Source, where: str) -> Any:
    """The clip's soundfile info, once its rate, channels and length are known to be within the limits."""
    try:
        info = soundfile.info(_opened(source))
    except AUDIO_ERRORS as exc:
        raise InvalidDataset(f"{where}: not a readable audio file ({exc})") from exc
    if not MIN_SAMPLE_RATE <= info.samplerate <= MAX_SAMPLE_RATE:
        raise InvalidDataset(
            f"{where}: sample rate {info.samplerate} Hz is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz"
        )
    if not 1 <= info.channels <= MAX_AUDIO_CHANNELS:
        raise InvalidDataset(f"{where}: {info.channels} channels; at most {MAX_AUDIO_CHANNELS} are read")
    if info.frames * info.channels > MAX_AUDIO_SAMPLES:
        raise InvalidDataset(
            f"{where}: {info.frames / info.samplerate:,.1f} s of {info.channels}-channel audio is more than the limit "
            f"of {MAX_AUDIO_SAMPLES:,} samples (ten minutes of mono 48 kHz); cut it into shorter clips"
        )
    return info


def read_audio(source: Source, where: str) -> tuple[Any, int]:
    """The samples (frames x channels, float32) and the sample rate, after the header passed the limits."""
    info = check_audio_header(source, where)
    most = MAX_AUDIO_SAMPLES // info.channels
    try:  # a header may understate the length: never read past the limit
        samples, rate = soundfile.read(_opened(source), frames=most + 1, dtype="float32", always_2d=True)
    except AUDIO_ERRORS as exc:
        raise InvalidDataset(f"{where}: not a readable audio file ({exc})") from exc
    if samples.shape[0] > most:
        raise InvalidDataset(f"{where}: longer than the limit of {MAX_AUDIO_SAMPLES:,} samples")
    return samples, int(rate)
