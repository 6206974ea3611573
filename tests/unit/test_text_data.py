"""Reading text datasets: formats, label mapping, stratified split, and precise errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tuneforge.workers.core.errors import InvalidDataset
from tuneforge.workers.core.text_data import load_text_dataset
from tuneforge.workers.messages import DataFile
from tuneforge.workers.spec import DataSettings

SETTINGS = DataSettings(training_file="files/x")


def data_file(tmp_path: Path, name: str, content: str) -> DataFile:
    path = tmp_path / name
    path.write_text(content)
    return DataFile(str(path), name)


def test_jsonl_with_string_labels(tmp_path: Path) -> None:
    rows = "".join(f'{{"text": "t{i}", "label": "{"bc"[i % 2]}"}}\n' for i in range(10)) + "\n"
    dataset = load_text_dataset(data_file(tmp_path, "d.jsonl", rows), None, SETTINGS, 0)
    assert dataset.labels == ["b", "c"]
    assert len(dataset.train) == 10 and dataset.validation == []
    assert dataset.train[1].label == 1


def test_csv_with_integer_labels_sorts_numerically(tmp_path: Path) -> None:
    rows = "text,label\n" + "".join(f'"hello, {i}",{[2, 10, 1][i % 3]}\n' for i in range(9))
    dataset = load_text_dataset(data_file(tmp_path, "d.csv", rows), None, SETTINGS, 0)
    assert dataset.labels == ["1", "2", "10"]
    assert dataset.train[0].text == "hello, 0"


def test_text_pairs_and_custom_columns(tmp_path: Path) -> None:
    rows = "".join(f'{{"q": "a{i}", "p": "b{i}", "y": {i % 2}}}\n' for i in range(4))
    settings = DataSettings(training_file="files/x", text_column="q", text_pair_column="p", label_column="y")
    dataset = load_text_dataset(data_file(tmp_path, "d.jsonl", rows), None, settings, 0)
    assert dataset.train[0].text_pair == "b0"


def test_stratified_split_keeps_label_shares(tmp_path: Path) -> None:
    rows = "".join(f'{{"text": "t{i}", "label": "{"a" if i < 80 else "b"}"}}\n' for i in range(100))
    settings = DataSettings(training_file="files/x", validation_fraction=0.2)
    dataset = load_text_dataset(data_file(tmp_path, "d.jsonl", rows), None, settings, 3)
    assert Counter(e.label for e in dataset.validation) == {0: 16, 1: 4}
    assert len(dataset.train) == 80
    again = load_text_dataset(data_file(tmp_path, "d.jsonl", rows), None, settings, 3)
    assert again.validation == dataset.validation, "the split is fixed by the seed"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "d.jsonl",
            '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c" "label": 1}\n',
            "d.jsonl line 3: not valid JSON",
        ),
        ("d.jsonl", '{"text": "a", "label": "x"}\n{"label": "y"}\n', "d.jsonl line 2: missing column 'text'"),
        ("d.jsonl", '{"text": "a", "label": "x"}\n[1, 2]\n', "line 2: expected a JSON object"),
        ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": null}\n', "line 2: 'label' must be"),
        ("d.csv", "text,label\na,x\nb,y,z\n", "d.csv line 3: more fields than the header"),
        ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', "at least 2 distinct labels"),
        ("d.txt", "a\n", "unsupported file type '.txt'"),
        ("d.jsonl", "", "no examples"),
    ],
)
def test_bad_data_names_the_line_and_problem(tmp_path: Path, name: str, content: str, message: str) -> None:
    with pytest.raises(InvalidDataset, match=message.replace("(", r"\(").replace("[", r"\[")) as raised:
        load_text_dataset(data_file(tmp_path, name, content), None, SETTINGS, 0)
    assert raised.value.reason == "INVALID_DATASET"


def test_validation_labels_must_occur_in_training(tmp_path: Path) -> None:
    train = data_file(tmp_path, "t.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    validation = data_file(tmp_path, "v.jsonl", '{"text": "a", "label": "x"}\n{"text": "c", "label": "z"}\n')
    with pytest.raises(InvalidDataset, match=r"v\.jsonl line 2: label .z. does not occur"):
        load_text_dataset(train, validation, SETTINGS, 0)


def test_non_utf8_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "\xff\xfe", "label": "x"}\n')
    with pytest.raises(InvalidDataset, match="not UTF-8"):
        load_text_dataset(DataFile(str(path), "d.jsonl"), None, SETTINGS, 0)
