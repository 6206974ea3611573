"""Tiny image and audio models and small learnable synthetic media data sets, made by the tests."""

from __future__ import annotations

import io
import json
import random
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220)}


def make_tiny_vit(folder: Path, seed: int = 0) -> Path:
    """A 2-layer ViT on 32x32 images (patch 8), saved with its image processor."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
        initializer_range=0.2,
    )
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def shape_png(colour: str, rng: random.Random) -> bytes:
    """A noisy background with a square of the class colour somewhere in it."""
    from PIL import Image

    pixels = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 90, size=(40, 40, 3), dtype=np.uint8)
    size = rng.randrange(14, 24)
    top, left = rng.randrange(0, 40 - size), rng.randrange(0, 40 - size)
    pixels[top : top + size, left : left + size] = COLOURS[colour]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def blank_png(width: int, height: int) -> bytes:
    """A one-bit PNG of any size: a few kilobytes even at 13000 x 13700 pixels (the shape of a decompression bomb)."""
    import warnings

    from PIL import Image

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        Image.new("1", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shapes_zip(path: Path, per_class: int, seed: int = 0, manifest: bool = False) -> Path:
    """Class folders (`red/0001.png`) or, with manifest, flat files named in `metadata.jsonl`."""
    rng = random.Random(seed)
    rows = []
    with zipfile.ZipFile(path, "w") as archive:
        for colour in COLOURS:
            for i in range(per_class):
                name = f"images/{colour}-{i:04d}.png" if manifest else f"shapes/{colour}/{i:04d}.png"
                archive.writestr(name, shape_png(colour, rng))
                rows.append({"file": name, "label": colour})
        if manifest:
            archive.writestr("metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_tar(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    """A tar archive with the given files (and symbolic links), for the safety tests."""
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return path


PITCHES = {"low": 220.0, "mid": 660.0, "high": 1760.0}


def save_tiny_wav2vec2(
    folder: Path, model_class: str, seed: int, return_attention_mask: bool, **config: object
) -> Path:
    """A 2-layer wav2vec2 (hidden 32, 16 kHz) of the given task class, saved with its feature extractor."""
    import torch
    import transformers

    torch.manual_seed(seed)
    settings: dict[str, object] = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "conv_dim": (16, 16, 16),
        "conv_stride": (5, 4, 4),
        "conv_kernel": (10, 4, 4),
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 2,
        "initializer_range": 0.2,
        "mask_time_prob": 0.0,
        **config,
    }
    getattr(transformers, model_class)(transformers.Wav2Vec2Config(**settings)).save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, do_normalize=True, return_attention_mask=return_attention_mask
    ).save_pretrained(folder)
    return folder


def make_tiny_wav2vec2(folder: Path, seed: int = 0) -> Path:
    """A tiny wav2vec2 audio classifier."""
    return save_tiny_wav2vec2(folder, "Wav2Vec2ForSequenceClassification", seed, False, num_labels=2, vocab_size=32)


def tone_wav(pitch: float, rng: random.Random, rate: int = 16000, seconds: float = 0.5) -> bytes:
    """A sine tone with a little noise, random phase and amplitude, as 16-bit WAV."""
    import soundfile

    t = np.arange(int(rate * seconds)) / rate
    wave = rng.uniform(0.3, 0.8) * np.sin(2 * np.pi * pitch * t + rng.uniform(0, 6.28))
    wave = wave + np.random.default_rng(rng.randrange(1 << 30)).normal(0, 0.02, size=t.shape)
    buffer = io.BytesIO()
    soundfile.write(buffer, wave.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def write_tones_zip(
    path: Path, per_class: int, seed: int = 0, rates: tuple[int, ...] = (16000,), seconds: float = 0.5
) -> Path:
    """Class folders of tones (`low/0001.wav`), at the given sample rates in turn (to exercise resampling)."""
    rng = random.Random(seed)
    with zipfile.ZipFile(path, "w") as archive:
        for name, pitch in PITCHES.items():
            for i in range(per_class):
                archive.writestr(f"{name}/{i:04d}.wav", tone_wav(pitch, rng, rates[i % len(rates)], seconds))
    return path


LETTER_PITCHES = {"a": 300.0, "b": 700.0, "c": 1500.0}


def make_tiny_wav2vec2_ctc(folder: Path, seed: int = 0) -> Path:
    """A tiny wav2vec2 CTC model without a vocabulary (the job builds one). Layer-normed convolutions learn the tone
    'words' far more reliably than the default group norm at this size."""
    return save_tiny_wav2vec2(
        folder, "Wav2Vec2ForCTC", seed, True, vocab_size=8, feat_extract_norm="layer", conv_bias=True
    )


def spoken_word(word: str, rng: random.Random, rate: int = 16000) -> bytes:
    """A 'word' spoken as one short tone per letter, with silence between words."""
    import soundfile

    pieces = []
    for letter in word:
        if letter == " ":
            pieces.append(np.zeros(int(0.08 * rate)))
            continue
        t = np.arange(int(rng.uniform(0.16, 0.2) * rate)) / rate
        pieces.append(0.6 * np.sin(2 * np.pi * LETTER_PITCHES[letter] * t))
        pieces.append(np.zeros(int(0.05 * rate)))
    wave = np.concatenate(pieces) + np.random.default_rng(rng.randrange(1 << 30)).normal(0, 0.01, sum(map(len, pieces)))
    buffer = io.BytesIO()
    soundfile.write(buffer, wave.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def write_words_zip(path: Path, count: int, seed: int = 0) -> Path:
    """Utterances of random 'words' over the letters a, b, c, with a transcript manifest."""
    rng = random.Random(seed)
    rows = []
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(count):
            words = ["".join(rng.choices("abc", k=rng.randrange(2, 4))) for _ in range(rng.randrange(1, 2))]
            transcript = " ".join(words)
            name = f"clips/{i:04d}.wav"
            archive.writestr(name, spoken_word(transcript, rng))
            rows.append({"file": name, "transcript": transcript.upper()})
        archive.writestr("metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return path


WHISPER_SPECIALS = ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|translate|>", "<|nocaptions|>")
WHISPER_TAIL = ("<|notimestamps|>", "<|startoflm|>", "<|startofprev|>")


def make_tiny_whisper(folder: Path, seed: int = 0, multilingual: bool = False) -> Path:
    """A tiny Whisper (1 encoder and 1 decoder layer, d_model 64) with a byte-level BPE vocabulary of the tone 'words'
    and Whisper's special tokens, its generation config set as the real tiny.en's is (or, multilingual, as the real
    tiny's, with one language)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        ["abc cab bca aa bb cc ab ba ca ac cb bc"] * 50,
        vocab_size=280,
        min_frequency=1,
        special_tokens=["<|endoftext|>"],
    )
    model_json = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_json["merges"]]
    tokenizer: Any = WhisperTokenizer(
        vocab=model_json["vocab"], merges=merges, additional_special_tokens=[*WHISPER_SPECIALS, *WHISPER_TAIL]
    )
    tokenizer.pad_token = tokenizer.eos_token
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (*WHISPER_SPECIALS, *WHISPER_TAIL)}
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_mel_bins=80,
        max_source_positions=100,  # a 2-second window (Whisper's is 30 s: 1,500 positions), 15 times cheaper
        max_target_positions=64,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        no_timestamps_token_id=ids["<|notimestamps|>"],
        is_multilingual=multilingual,
        max_length=64,
    )
    if multilingual:
        model.generation_config.lang_to_id = {"<|en|>": ids["<|en|>"]}
        model.generation_config.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    model.save_pretrained(folder)
    extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=2)
    WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
