"""Speech recognition: an archive of utterances with a transcript manifest, for CTC models (wav2vec2 ...) and
encoder-decoder models (Whisper)."""

from tuneforge.workers.tasks.audio_classification import CLIP_SECONDS
from tuneforge.workers.tasks.definition import TaskDefinition, TaskFlag

DEFINITION = TaskDefinition(
    name="speech_recognition",
    modality="audio",
    metrics=("eval_loss", "eval_wer", "eval_cer"),
    lower_is_better=frozenset({"eval_loss", "eval_wer", "eval_cer"}),
    reads=frozenset({"data.clip_seconds", "data.transcript_column", "data.language"}),
    flags=(
        CLIP_SECONDS,
        TaskFlag("--transcript-column", "data.transcript_column", str, "the manifest's transcript column"),
        TaskFlag("--language", "data.language", str, "Whisper: the utterances' language (default: detected)"),
    ),
)
