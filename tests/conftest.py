"""Shared fixtures: offline Hugging Face, a tiny BERT model root, and a learnable keyword dataset."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from tests.tiny import keyword_rows, make_tiny_bert, write_jsonl

if TYPE_CHECKING:
    from tests.postgres import PostgresServer

pytest_plugins = ["tests.ci_skips", "pytester"]


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


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A private PostgreSQL server for the whole session (started on first use)."""
    from tests.postgres import start_postgres

    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()
