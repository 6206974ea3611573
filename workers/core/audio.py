"""Audio decoding and augmentation shared by audio classification and speech recognition: soundfile decodes,
torchaudio resamples and masks. Every problem names the file."""

from __future__ import annotations

import io
import math
import wave
from typing import Any

import numpy as np
import soundfile
import torch
import torchaudio

from tuneforge.workers.core.errors import InvalidDataset
from tuneforge.workers.core.input_limits import Source, read_audio
from tuneforge.workers.core.media_data import MediaItem
from tuneforge.workers.spec import AugmentationSettings

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")


def declared_wav_frames(path: Any) -> int | None:
    """Frames a PCM WAV header declares (libsndfile quietly reads what is there, so truncation must be checked)."""
    try:
        with wave.open(str(path), "rb") as header:
            return header.getnframes()
    except (wave.Error, EOFError, OSError):
        return None


def check_audio(item: MediaItem, max_seconds: float | None = None) -> float:
    """Decodes the whole file once: unreadable, truncated, empty, too long or oddly sampled audio fails here.
    Returns its duration in seconds."""
    samples, rate = read_audio(item.path, item.source)
    frames = samples.shape[0]
    if frames == 0:
        raise InvalidDataset(f"{item.source}: the audio is empty")
    declared = declared_wav_frames(item.path) if item.path.suffix.lower() == ".wav" else None
    if declared is not None and frames < declared:
        raise InvalidDataset(
            f"{item.source}: truncated: the header declares {declared} frames, the file holds {frames}"
        )
    if max_seconds is not None and frames / rate > max_seconds:
        raise InvalidDataset(
            f"{item.source}: {frames / rate:.1f} s is longer than data.clip_seconds ({max_seconds:g} s)"
        )
    return float(frames / rate)


def load_mono(source: Source, where: str, sample_rate: int) -> torch.Tensor:
    """The clip (a file, or encoded bytes) as one channel (channels averaged) at the model's sample rate."""
    samples, rate = read_audio(source, where)
    wave = torch.from_numpy(samples).mean(dim=1)
    if rate != sample_rate:
        wave = torchaudio.functional.resample(wave, rate, sample_rate)
    return wave


def crop_or_pad(
    wave: torch.Tensor, length: int, random_offset: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """Exactly `length` samples: a (random, in training) window of longer clips, zero padding after shorter ones."""
    if wave.shape[0] > length:
        start = int(torch.randint(0, wave.shape[0] - length + 1, (1,), generator=generator)) if random_offset else 0
        return wave[start : start + length]
    return torch.nn.functional.pad(wave, (0, length - wave.shape[0]))


def augment_wave(wave: torch.Tensor, settings: AugmentationSettings, sample_rate: int) -> torch.Tensor:
    """Random gain, additive white noise at a random SNR, and a random circular time shift."""
    if settings.max_gain_db > 0:
        gain_db = (torch.rand(()) * 2 - 1) * settings.max_gain_db
        wave = wave * (10.0 ** (gain_db / 20.0))
    if settings.noise_snr_db > 0:
        snr_db = settings.noise_snr_db + torch.rand(()) * 20.0
        power = wave.pow(2).mean().clamp_min(1e-10)
        wave = wave + torch.randn_like(wave) * torch.sqrt(power / (10.0 ** (snr_db / 10.0)))
    if settings.max_shift_seconds > 0:
        limit = max(1, math.floor(settings.max_shift_seconds * sample_rate))
        wave = torch.roll(wave, int(torch.randint(-limit, limit + 1, (1,))))
    return wave


def spec_augment(features: torch.Tensor) -> torch.Tensor:
    """SpecAugment-style masking of one band along each of the last two axes (frequency and time)."""
    freq = torchaudio.transforms.FrequencyMasking(freq_mask_param=max(1, features.shape[-2] // 8))
    time = torchaudio.transforms.TimeMasking(time_mask_param=max(1, features.shape[-1] // 8))
    masked: torch.Tensor = time(freq(features.unsqueeze(0))).squeeze(0)
    return masked


def sample_wav(rng: np.random.Generator, index: int, rate: int = 16_000) -> bytes:
    """A made-up WAV of quiet noise, 0.5 s long and a quarter second longer per index (export checks)."""
    samples = (0.1 * rng.standard_normal(int(rate * (0.5 + 0.25 * index)))).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV")
    return buffer.getvalue()
