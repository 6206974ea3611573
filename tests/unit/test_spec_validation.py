"""JobSpec validation: defaults filled, every bad field named at once, unbuilt options listed separately."""

from __future__ import annotations

from pathlib import Path

from tuneforge.server.spec_validation import validate_spec
from tuneforge.v1 import job_spec_pb2 as pb
from tuneforge.workers.spec import AdaptationMethod, OptimizerKind, ScheduleKind


def minimal(base_model: str = "org/model") -> pb.JobSpec:
    return pb.JobSpec(task=pb.TEXT_CLASSIFICATION, base_model=base_model, data=pb.DataSpec(training_file="files/f1"))


def fields_of(spec: pb.JobSpec, roots: list[Path] | None = None) -> dict[str, str]:
    return {v.field: v.description for v in validate_spec(spec, roots or []).violations}


def test_minimal_spec_gets_documented_defaults() -> None:
    result = validate_spec(minimal(), [])
    assert not result.violations
    spec = result.spec
    assert spec is not None and spec.task == "text_classification"
    hp = spec.hyperparameters
    assert (hp.epochs, hp.batch_size, hp.learning_rate, hp.weight_decay) == (3, 16, 5e-5, 0.01)
    assert hp.optimizer is OptimizerKind.ADAMW and hp.schedule.kind is ScheduleKind.LINEAR and hp.max_grad_norm == 1.0
    assert spec.data.text_column == "text" and spec.data.label_column == "label"
    assert spec.evaluation.log_every_steps == 10


def test_head_only_training_defaults_to_a_larger_learning_rate() -> None:
    spec = minimal()
    spec.adaptation.method = pb.Adaptation.FROZEN_BACKBONE
    result = validate_spec(spec, [])
    assert result.spec is not None and result.spec.hyperparameters.learning_rate == 1e-3
    assert result.spec.adaptation.method is AdaptationMethod.FROZEN_BACKBONE


def test_explicit_zero_is_kept_where_zero_means_something() -> None:
    spec = minimal()
    spec.hyperparameters.weight_decay = 0.0
    spec.hyperparameters.max_grad_norm = 0.0
    result = validate_spec(spec, [])
    assert result.spec is not None
    assert result.spec.hyperparameters.weight_decay == 0.0 and result.spec.hyperparameters.max_grad_norm == 0.0


def test_every_bad_field_is_reported_together() -> None:
    spec = pb.JobSpec(
        base_model="not a model!",
        data=pb.DataSpec(training_file="train.jsonl", validation_fraction=0.9),
        hyperparameters=pb.Hyperparameters(
            epochs=-1,
            batch_size=10,
            gradient_accumulation_steps=3,
            learning_rate=float("nan"),
            seed=-5,
            schedule=pb.Schedule(kind=pb.Schedule.COSINE, gamma=0.5),
        ),
        head=pb.HeadSpec(hidden_sizes=[0], dropout=1.0),
        priority=1000,
    )
    problems = fields_of(spec)
    assert set(problems) >= {
        "job.spec.task",
        "job.spec.base_model",
        "job.spec.data.training_file",
        "job.spec.data.validation_fraction",
        "job.spec.hyperparameters.epochs",
        "job.spec.hyperparameters.gradient_accumulation_steps",
        "job.spec.hyperparameters.learning_rate",
        "job.spec.hyperparameters.seed",
        "job.spec.hyperparameters.schedule.gamma",
        "job.spec.head.hidden_sizes[0]",
        "job.spec.head.dropout",
        "job.spec.priority",
    }
    assert "only used with kind STEP or MULTI_STEP" in problems["job.spec.hyperparameters.schedule.gamma"]


def test_options_meant_for_another_setting_are_not_ignored() -> None:
    spec = minimal()
    spec.adaptation.num_frozen_blocks = 2
    spec.hyperparameters.momentum = 0.5
    spec.data.validation_file = "files/v1"
    spec.data.validation_fraction = 0.1
    assert set(fields_of(spec)) == {
        "job.spec.adaptation.num_frozen_blocks",
        "job.spec.hyperparameters.momentum",
        "job.spec.data.validation_fraction",
    }


def test_ranks_default_to_one_per_gpu_and_must_match_them() -> None:
    spec = minimal()
    assert validate_spec(spec, []).spec.ranks == 1  # type: ignore[union-attr]
    spec.resources.gpus = 4
    assert validate_spec(spec, []).spec.ranks == 4  # type: ignore[union-attr]
    spec.resources.gpus, spec.resources.ranks = 0, 3
    assert validate_spec(spec, []).spec.ranks == 3  # type: ignore[union-attr]  # gloo ranks on CPU workers
    spec.resources.gpus = 2
    assert set(fields_of(spec)) == {"job.spec.resources.ranks"}
    spec.resources.gpus, spec.resources.ranks = 0, -1
    assert set(fields_of(spec)) == {"job.spec.resources.ranks"}


def test_local_models_must_lie_under_a_model_root(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "good").mkdir(parents=True)
    (root / "good" / "config.json").write_text("{}")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "config.json").write_text("{}")
    (root / "escape").symlink_to(tmp_path / "outside")
    assert validate_spec(minimal(str(root / "good")), [root]).spec is not None
    for path, message in [
        (tmp_path / "outside", "not under a model root"),
        (root / "escape", "not under a model root"),
        (root / "missing", "not a model folder"),
    ]:
        assert message in fields_of(minimal(str(path)), [root])["job.spec.base_model"]
    assert "without `..`" in fields_of(minimal(f"{root}/good/../good"), [root])["job.spec.base_model"]


def test_model_folders_that_could_run_code_or_read_outside_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "models"

    def folder(name: str, config: str = "{}", files: tuple[str, ...] = ()) -> Path:
        path = root / name
        path.mkdir(parents=True)
        (path / "config.json").write_text(config)
        for file in files:
            (path / file).write_bytes(b"weights")
        return path

    safe = folder("safe", files=("model.safetensors", "training_args.bin"))  # a stray .bin beside safetensors is fine
    pickled = folder("pickled", files=("pytorch_model.bin",))
    remote = folder("remote", config='{"model_type": "x", "auto_map": {"AutoModel": "modeling_x.XModel"}}')
    linked = folder("linked", files=("model.safetensors",))
    (tmp_path / "secret.txt").write_text("outside")
    (linked / "tokenizer.json").symlink_to(tmp_path / "secret.txt")
    broken = folder("broken", config="{not json")
    assert validate_spec(minimal(str(safe)), [root]).spec is not None
    for path, message in [
        (pickled, "only pickled weights (pytorch_model.bin)"),
        (remote, "needs remote code"),
        (linked, "links outside the model roots (tokenizer.json)"),
        (broken, "not valid JSON"),
    ]:
        assert message in fields_of(minimal(str(path)), [root])["job.spec.base_model"]


def test_toolbox_fields_convert_with_defaults() -> None:
    spec = minimal()
    spec.data.validation_fraction = 0.2
    spec.adaptation.method = pb.Adaptation.LORA
    spec.adaptation.lora.rank = 4
    spec.hyperparameters.optimizer = pb.Hyperparameters.SGD
    spec.hyperparameters.nesterov = True
    spec.hyperparameters.head_learning_rate = 1e-3
    spec.hyperparameters.layer_decay = 0.8
    spec.hyperparameters.label_smoothing = 0.1
    spec.hyperparameters.class_balance = pb.Hyperparameters.BALANCED_SAMPLING
    spec.hyperparameters.schedule.kind = pb.Schedule.REDUCE_ON_PLATEAU
    spec.evaluation.best_metric = "eval_accuracy"
    spec.evaluation.early_stopping_patience = 2
    result = validate_spec(spec, [])
    assert not result.violations and result.spec is not None
    converted = result.spec
    assert converted.adaptation.lora is not None and (
        converted.adaptation.lora.rank,
        converted.adaptation.lora.alpha,
    ) == (4, 8.0)
    hp = converted.hyperparameters
    assert hp.nesterov and hp.momentum == 0.9 and hp.layer_decay == 0.8 and hp.label_smoothing == 0.1
    assert hp.schedule.patience == 1 and converted.maximize


def test_toolbox_fields_are_checked() -> None:
    spec = minimal()
    spec.adaptation.method = pb.Adaptation.LAST_BLOCKS_TRAINABLE
    spec.adaptation.unfreeze_every_epochs = 2
    spec.hyperparameters.nesterov = True
    spec.hyperparameters.schedule.kind = pb.Schedule.MULTI_STEP
    spec.hyperparameters.schedule.milestones.extend([10, 5])
    spec.hyperparameters.schedule.power = 2.0
    spec.evaluation.best_metric = "eval_wer"
    spec.evaluation.early_stopping_patience = 3
    problems = fields_of(spec)
    assert set(problems) == {
        "job.spec.adaptation.num_trainable_blocks",
        "job.spec.adaptation.unfreeze_every_epochs",
        "job.spec.hyperparameters.nesterov",
        "job.spec.hyperparameters.schedule.milestones",
        "job.spec.hyperparameters.schedule.power",
        "job.spec.evaluation.best_metric",
        "job.spec.evaluation.early_stopping_patience",
    }
    assert "needs validation data" in problems["job.spec.evaluation.early_stopping_patience"]


def test_fields_of_other_tasks_are_refused() -> None:
    text = minimal()
    text.data.augmentation.enabled = True
    text.data.clip_seconds = 2.0
    text.evaluation.best_metric = "eval_wer"
    assert set(fields_of(text)) == {
        "job.spec.data.augmentation",
        "job.spec.data.clip_seconds",
        "job.spec.evaluation.best_metric",
    }
    speech = minimal()
    speech.task = pb.SPEECH_RECOGNITION
    speech.data.max_sequence_length = 128
    speech.hyperparameters.label_smoothing = 0.1
    speech.head.hidden_sizes.append(16)
    speech.evaluation.best_metric = "eval_accuracy"
    assert set(fields_of(speech)) == {
        "job.spec.data.max_sequence_length",
        "job.spec.hyperparameters.label_smoothing",
        "job.spec.head",
        "job.spec.evaluation.best_metric",
    }


def test_augmentation_recipe_and_overrides() -> None:
    spec = minimal()
    spec.task = pb.IMAGE_CLASSIFICATION
    spec.data.augmentation.enabled = True
    spec.data.augmentation.horizontal_flip = False
    spec.data.augmentation.color_jitter = 0.0
    result = validate_spec(spec, [])
    assert result.spec is not None and result.spec.data.augmentation is not None
    augmentation = result.spec.data.augmentation
    assert (augmentation.crop_scale_min, augmentation.horizontal_flip, augmentation.color_jitter) == (0.5, False, 0.0)
    spec.data.augmentation.crop_scale_min = 1.5
    assert "job.spec.data.augmentation.crop_scale_min" in fields_of(spec)


def test_webhook_urls_must_be_http_urls_and_few() -> None:
    spec = minimal()
    spec.notifications.webhook_urls.extend(["https://hooks.example/a", "ftp://x/y", "https://user:pw@h/", "http:///"])
    assert set(fields_of(spec)) == {f"job.spec.notifications.webhook_urls[{i}]" for i in (1, 2, 3)}
    spec = minimal()
    spec.notifications.webhook_urls.extend([f"https://hooks.example/{i}" for i in range(6)])
    assert set(fields_of(spec)) == {"job.spec.notifications.webhook_urls"}


def test_a_gguf_file_under_a_model_root_is_a_text_generation_base_model(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    (root / "model.Q4_1.gguf").write_bytes(b"GGUF" + bytes(28))
    (root / "fake.gguf").write_bytes(b"PK\x03\x04 a zip, not a model")
    (root / "folder.gguf").mkdir()
    (tmp_path / "outside.gguf").write_bytes(b"GGUF" + bytes(28))

    def generation(path: Path) -> pb.JobSpec:
        spec = minimal(str(path))
        spec.task = pb.TEXT_GENERATION
        return spec

    assert validate_spec(generation(root / "model.Q4_1.gguf"), [root]).spec is not None
    for path, message in [
        (root / "fake.gguf", "is not a GGUF file (it does not start with `GGUF`)"),
        (root / "folder.gguf", "is a folder, not a GGUF file"),
        (root / "missing.gguf", "cannot be read (no such GGUF file)"),
        (tmp_path / "outside.gguf", "not under a model root"),
    ]:
        assert message in fields_of(generation(path), [root])["job.spec.base_model"]
    classifier = fields_of(minimal(str(root / "model.Q4_1.gguf")), [root])["job.spec.base_model"]
    assert classifier == (
        "a GGUF file holds a causal language model: use it with TEXT_GENERATION, not TEXT_CLASSIFICATION"
    )
