"""Shared fixtures: offline Hugging Face, a tiny BERT model root, and a learnable keyword dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from tests.tiny import keyword_rows, make_tiny_bert, write_jsonl


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding `tiny-bert/`, usable as the server's --model-root."""
    root = tmp_path_factory.mktemp("models")
    make_tiny_bert(root / "tiny-bert")
    return root


@pytest.fixture(scope="session")
def tiny_bert(model_root: Path) -> Path:
    return model_root / "tiny-bert"


@pytest.fixture(scope="session")
def keyword_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 labelled sentences in three topics, as JSONL."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", keyword_rows(120))
