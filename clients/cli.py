"""The `tuneforge` command: upload, submit, watch, jobs, get, cancel, pause, resume, download, predict, generate,
chat, export, report, health, demo, serve."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import secrets
import sys
import tempfile
import webbrowser
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from tuneforge.clients.archive import extract_archive
from tuneforge.clients.artifacts import REPORT, read_member, verify_artifact
from tuneforge.clients.client import TuneforgeClient, TuneforgeError
from tuneforge.clients.credentials import Credentials
from tuneforge.clients.generate_cli import add_generate_commands
from tuneforge.clients.spec_flags import (
    add_spec_arguments,
    add_spec_file_arguments,
    load_spec_file,
    set_data_files,
    spec_from_arguments,
)
from tuneforge.clients.sweep_cli import add_sweep_commands
from tuneforge.clients.watch_view import render_watch
from tuneforge.v1 import job_spec_pb2, jobs_pb2

STATE = jobs_pb2.Job.State
console = Console(stderr=True, markup=False)  # server and user text is printed as is, never read as markup
out = Console(markup=False)


def _print_json(message: Message | Sequence[Message]) -> None:
    data: Any = MessageToDict(message) if isinstance(message, Message) else [MessageToDict(m) for m in message]
    print(json.dumps(data, indent=2))


def cmd_upload(client: TuneforgeClient, args: argparse.Namespace) -> int:
    path = Path(args.path)
    with Progress(BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=console, disable=args.json) as progress:
        task = progress.add_task("upload", total=path.stat().st_size)
        file = client.upload_file(path, progress=lambda sent, total: progress.update(task, completed=sent))
    _print_json(file) if args.json else print(file.name)
    return 0


def cmd_submit(client: TuneforgeClient, args: argparse.Namespace) -> int:
    job = client.create_job(spec_from_arguments(args), display_name=args.name, request_id=args.request_id)
    _print_json(job) if args.json else print(job.name)
    return cmd_watch(client, argparse.Namespace(job=job.name, json=args.json)) if args.watch else 0


def cmd_create(client: TuneforgeClient, args: argparse.Namespace) -> int:
    """A job from a JobSpec JSON file (see examples/), with the data files given on the command line."""
    spec = load_spec_file(Path(args.spec))
    set_data_files(spec.data, args)
    job = client.create_job(spec, display_name=args.name, request_id=args.request_id)
    _print_json(job) if args.json else print(job.name)
    return cmd_watch(client, argparse.Namespace(job=job.name, json=args.json)) if args.watch else 0


def cmd_watch(client: TuneforgeClient, args: argparse.Namespace) -> int:
    if args.json:
        final: int | None = None
        for event in client.watch(args.job):
            print(json.dumps(MessageToDict(event)), flush=True)
            if event.WhichOneof("payload") == "state_change":
                final = event.state_change.to_state
    else:
        final = render_watch(client.watch(args.job), console)
    if final is None:
        final = client.get_job(args.job).state
    if final != STATE.SUCCEEDED:
        job = client.get_job(args.job)
        console.print(f"{args.job} ended {STATE.Name(job.state)}: {job.error.reason} {job.error.message}", style="red")
        return 1
    return 0


def _jobs_table(jobs: list[jobs_pb2.Job]) -> Table:
    table = Table("name", "state", "display name", "progress", "eval accuracy", "created")
    for job in jobs:
        progress = f"{job.progress.step}/{job.progress.total_steps}" if job.progress.total_steps else ""
        accuracy = job.latest_metrics.get("eval_accuracy")
        table.add_row(
            job.name,
            STATE.Name(job.state),
            job.display_name,
            progress,
            f"{accuracy:.4f}" if accuracy is not None else "",
            job.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
        )
    return table


def cmd_jobs(client: TuneforgeClient, args: argparse.Namespace) -> int:
    states = [STATE.Value(s.upper()) for s in args.state]
    jobs = client.list_jobs(states=states, limit=args.limit)
    _print_json(jobs) if args.json else out.print(_jobs_table(jobs))
    return 0


def cmd_get(client: TuneforgeClient, args: argparse.Namespace) -> int:
    job = client.get_job(args.job)
    if args.json:
        _print_json(job)
        return 0
    out.print(_jobs_table([job]))
    if job.error.reason:
        out.print(f"error: {job.error.reason}: {job.error.message}")
    for name, value in sorted(job.latest_metrics.items()):
        out.print(f"  {name} = {value:.6g}")
    return 0


def _control(
    action: Callable[[TuneforgeClient, str], jobs_pb2.Job],
) -> Callable[[TuneforgeClient, argparse.Namespace], int]:
    """cancel, pause and resume: one call on one job, then its new state."""

    def run(client: TuneforgeClient, args: argparse.Namespace) -> int:
        job = action(client, args.job)
        _print_json(job) if args.json else print(f"{job.name} {STATE.Name(job.state)}")
        return 0

    return run


def cmd_download(client: TuneforgeClient, args: argparse.Namespace) -> int:
    target = Path(args.output)
    with tempfile.TemporaryDirectory() as scratch:
        archive = Path(scratch) / "artifact.tar"
        artifact = client.download_artifact(args.job, archive)
        names = extract_archive(archive, target)
    if args.json:
        print(json.dumps({"directory": str(target), "files": names, "sha256": artifact.sha256}))
    else:
        print(f"{target} ({len(names)} files, {artifact.size_bytes:,} bytes, sha256 {artifact.sha256[:12]})")
    return 0


def cmd_predict(client: TuneforgeClient, args: argparse.Namespace) -> int:
    """Texts are given as they are; images and audio clips as file paths (the job's task says which)."""
    task = client.get_job(args.job).spec.task
    if task == job_spec_pb2.TEXT_CLASSIFICATION:
        predictions = client.predict(args.job, texts=args.inputs, top_k=args.top_k, checkpoint=args.checkpoint)
    else:
        blobs = [Path(path).read_bytes() for path in args.inputs]
        if task == job_spec_pb2.IMAGE_CLASSIFICATION:
            predictions = client.predict(args.job, images=blobs, top_k=args.top_k, checkpoint=args.checkpoint)
        else:
            predictions = client.predict(args.job, audio=blobs, top_k=args.top_k, checkpoint=args.checkpoint)
    if args.json:
        print(json.dumps([MessageToDict(p) for p in predictions]))
        return 0
    table = Table("input", "prediction")
    for given, prediction in zip(args.inputs, predictions, strict=True):
        scores = ", ".join(f"{s.label} {s.probability:.1%}" for s in prediction.labels)
        answer = prediction.text or prediction.transcript or scores
        table.add_row(given if len(given) <= 60 else given[:57] + "...", answer)
    out.print(table)
    return 0


def cmd_export(client: TuneforgeClient, args: argparse.Namespace) -> int:
    """Saves a checked export of the job's model (made on the server the first time)."""
    format = job_spec_pb2.ExportFormat.Value(args.format.upper())
    suffix = {"onnx": ".onnx", "torchscript": ".pt"}.get(args.format, ".tar")
    target = Path(args.output or f"{args.job.rsplit('/', 1)[-1]}-{args.format}{suffix}")
    export = client.export_model(args.job, format, target, args.opset)
    if args.json:
        print(json.dumps({"file": str(target), **MessageToDict(export)}))
        return 0
    check = export.check
    figures = f"; checked on {check.samples} samples, largest difference {check.max_abs_difference:.2g}"
    print(f"{target} ({export.size_bytes:,} bytes, sha256 {export.sha256[:12]}){figures if check.samples else ''}")
    return 0


def cmd_report(client: TuneforgeClient, args: argparse.Namespace) -> int:
    """Saves the job's evaluation report (from its artifact) as one HTML file, and opens it when asked."""
    target = Path(args.output or f"{args.job.rsplit('/', 1)[-1]}-report.html")
    with tempfile.TemporaryDirectory() as scratch:
        archive = Path(scratch) / "artifact.tar"
        client.download_artifact(args.job, archive)
        try:
            page = read_member(archive, REPORT)
        except KeyError:
            console.print(f"{args.job}'s artifact has no report (it was made before reports existed)", style="red")
            return 1
    target.write_bytes(page)
    print(json.dumps({"report": str(target)}) if args.json else f"report saved to {target}")
    if args.open:
        webbrowser.open(target.resolve().as_uri())
    return 0


def cmd_health(client: TuneforgeClient, args: argparse.Namespace) -> int:
    """Exit 0 only when SERVING: usable as a container HEALTHCHECK or a probe."""
    status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def cmd_new_token(args: argparse.Namespace) -> int:
    """The token goes to the caller, only its SHA-256 to the server."""
    token = secrets.token_urlsafe(32)
    name = args.name or f"{args.tenant}-{token[:6]}"
    print(f"token: {token}")
    print("\n# add to the server's access file:")
    print(f'[[tokens]]\nname = "{name}"\nsha256 = "{hashlib.sha256(token.encode()).hexdigest()}"')
    print(f'tenant = "{args.tenant}"\nrole = "{args.role}"')
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Checks a downloaded artifact against its manifest: exit 0 only when every file's digest matches."""
    result = verify_artifact(args.artifact)
    if args.json:
        print(json.dumps(dataclasses.asdict(result) | {"ok": result.ok}))
    elif result.ok:
        out.print(f"{args.artifact}: all {result.checked} files match the manifest", style="green")
    else:
        problems = (("differs", result.mismatched), ("missing", result.missing), ("unlisted", result.unlisted))
        for label, names in problems:
            for name in names:
                out.print(f"{label}: {name}", style="red")
    return 0 if result.ok else 1


def cmd_files(client: TuneforgeClient, args: argparse.Namespace) -> int:
    files = client.list_files()
    if args.json:
        _print_json(files)
        return 0
    table = Table("name", "filename", "bytes", "sha256")
    for file in files:
        table.add_row(file.name, file.filename, f"{file.size_bytes:,}", file.sha256[:12])
    out.print(table)
    return 0


def _needs_server(command: str, exc: ImportError) -> int:
    """A command beyond the light client, run where the server is not installed: what to install."""
    console.print(f"`tuneforge {command}` needs the server: `pip install 'tuneforge[server]'` ({exc})", style="red")
    return 2


def _serve(args: argparse.Namespace) -> int:
    """`tuneforge serve`: the server, imported only when the command runs (it needs the [server] extra). The
    import is written out so the import contracts see it (pyproject.toml allows exactly this one)."""
    try:
        from tuneforge.server import main as server_main
    except ImportError as exc:
        return _needs_server("serve", exc)
    return int(server_main.run(args))


def _demo(args: argparse.Namespace) -> int:
    """`tuneforge demo`: needs the server too, and plain transformers to load the model it downloads."""
    try:
        from tuneforge.clients import demo
    except ImportError as exc:
        return _needs_server("demo", exc)
    return int(demo.run(args))


def _env_path(name: str) -> Path | None:
    """A default from the environment (containers set TLS files once for every command, health checks included)."""
    value = os.environ.get(name)
    return Path(value) if value else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description=__doc__)
    parser.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of the Tuneforge server")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline for each call, seconds")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--token", help="bearer token (default: $TUNEFORGE_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="speak TLS, trusting the system's CAs")
    parser.add_argument(
        "--tls-ca", type=Path, default=_env_path("TUNEFORGE_TLS_CA"), help="PEM CA of the server (implies --tls)"
    )
    parser.add_argument(
        "--tls-cert", type=Path, default=_env_path("TUNEFORGE_TLS_CERT"), help="PEM client certificate (mutual TLS)"
    )
    parser.add_argument("--tls-key", type=Path, default=_env_path("TUNEFORGE_TLS_KEY"), help="its PEM private key")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler: Callable[..., int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(handler=handler)
        return p

    command("upload", cmd_upload, "upload a dataset file; prints its name").add_argument("path")
    submit = command("submit", cmd_submit, "create a fine-tuning job; prints its name")
    add_spec_arguments(submit)
    submit.add_argument("--name", default="", help="display name")
    submit.add_argument("--request-id", help="idempotency key (a UUID); default: a new one")
    submit.add_argument("--watch", action="store_true", help="watch the job after creating it")
    create = command("create", cmd_create, "create a job from a JobSpec JSON file (see examples/)")
    add_spec_file_arguments(create, "JobSpec", "examples/")
    command("watch", cmd_watch, "follow a job live; exit 0 when it SUCCEEDED").add_argument("job")
    jobs = command("jobs", cmd_jobs, "list jobs, newest first")
    jobs.add_argument("--state", action="append", default=[], help="only jobs in this state (repeatable)")
    jobs.add_argument("--limit", type=int, default=50)
    command("get", cmd_get, "show one job").add_argument("job")
    command("cancel", _control(TuneforgeClient.cancel_job), "cancel a job").add_argument("job")
    command("pause", _control(TuneforgeClient.pause_job), "checkpoint a job and free its worker").add_argument("job")
    command("resume", _control(TuneforgeClient.resume_job), "queue a paused job again").add_argument("job")
    download = command("download", cmd_download, "download and unpack a job's model")
    download.add_argument("job")
    download.add_argument("-o", "--output", required=True, help="folder to unpack into")
    predict = command("predict", cmd_predict, "run a finished job's model on texts, image files or audio files")
    predict.add_argument("job")
    predict.add_argument("inputs", nargs="+", help="texts, or paths of images or audio clips")
    predict.add_argument("--top-k", type=int, default=3)
    predict.add_argument("--checkpoint", default="", help="latest or step-N of a running or paused job")
    export = command("export", cmd_export, "save a checked ONNX, TorchScript or merged-LoRA export of a job's model")
    export.add_argument("job")
    export.add_argument("--format", choices=["onnx", "torchscript", "merged_lora", "hugging_face"], default="onnx")
    export.add_argument("--opset", type=int, default=0, help="ONNX opset (default 18)")
    export.add_argument("-o", "--output", help="file to write (default: JOB-FORMAT.onnx/.pt/.tar here)")
    report = command("report", cmd_report, "save (and open) a job's evaluation report")
    report.add_argument("job")
    report.add_argument("-o", "--output", help="HTML file to write (default: JOB-report.html here)")
    report.add_argument("--open", action="store_true", help="open it in the web browser")
    command("files", cmd_files, "list uploaded files")
    health = command("health", cmd_health, "print the server's health; exit 0 only when SERVING")
    health.add_argument("--service", default="", help="one service, e.g. tuneforge.v1.JobService (default: all)")
    add_sweep_commands(command)
    add_generate_commands(command)

    serve = sub.add_parser("serve", help="run the server (needs tuneforge[server])")
    serve.set_defaults(local=_serve)
    _add_serve_arguments(serve)
    verify = sub.add_parser("verify", help="check a downloaded artifact's files against its manifest")
    verify.add_argument("artifact", type=Path)
    verify.set_defaults(local=cmd_verify)
    new_token = sub.add_parser("new-token", help="make a bearer token and its line for the server's access file")
    new_token.set_defaults(local=cmd_new_token)
    new_token.add_argument("--tenant", required=True)
    new_token.add_argument("--role", choices=["user", "admin"], default="user")
    new_token.add_argument("--name", default="", help="shown in the server's audit log")
    demo = sub.add_parser("demo", help="fine-tune MiniLM on BBC News through a fresh local server")
    demo.set_defaults(local=_demo)
    demo.add_argument("--examples-per-class", type=int, default=120, help="training subset size per topic")
    demo.add_argument("--keep", action="store_true", help="keep the demo's data dir")
    return parser


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's flags, when the server is installed (the light client works without it)."""
    try:
        from tuneforge.server import main as server_main
    except ImportError:
        return
    server_main.add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "local"):
        return int(args.local(args))
    credentials = Credentials.from_environment(
        token=args.token, tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key
    )
    with TuneforgeClient(args.server, timeout_s=args.timeout, credentials=credentials) as client:
        try:
            return int(args.handler(client, args))
        except TuneforgeError as error:
            console.print(f"error: {error}", style="red")
            for field, description in error.field_violations.items():
                console.print(f"  {field}: {description}")
            for subject, description in error.quota_violations.items():
                console.print(f"  quota of {subject}: {description}")
            return 1


if __name__ == "__main__":
    sys.exit(main())
