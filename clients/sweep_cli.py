"""The `tuneforge sweep ...` commands: create a sweep from a JSON spec, list, show, watch and cancel."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.table import Table

from tuneforge.clients.client import TuneforgeClient
from tuneforge.clients.spec_flags import add_spec_file_arguments, load_sweep_file, set_data_files
from tuneforge.v1 import sweeps_pb2

SWEEP = sweeps_pb2.Sweep.State
TRIAL = sweeps_pb2.Trial.State
Command = Callable[[str, Callable[..., int], str], argparse.ArgumentParser]
out = Console(markup=False)
console = Console(stderr=True, markup=False)


def cmd_create(client: TuneforgeClient, args: argparse.Namespace) -> int:
    spec = load_sweep_file(Path(args.spec))
    set_data_files(spec.base.data, args)
    sweep = client.create_sweep(spec, display_name=args.name, request_id=args.request_id)
    print(json.dumps(MessageToDict(sweep), indent=2)) if args.json else print(sweep.name)
    return cmd_watch(client, argparse.Namespace(sweep=sweep.name, json=args.json)) if args.watch else 0


def cmd_list(client: TuneforgeClient, args: argparse.Namespace) -> int:
    sweeps = client.list_sweeps()
    if args.json:
        print(json.dumps([MessageToDict(s) for s in sweeps], indent=2))
        return 0
    table = Table("name", "state", "display name", "trials", "best value", "best job")
    for sweep in sweeps:
        ended = sum(t.state != TRIAL.RUNNING for t in sweep.trials)
        best = sweep.best_trial
        table.add_row(
            sweep.name,
            SWEEP.Name(sweep.state),
            sweep.display_name,
            f"{ended}/{sweep.spec.max_trials or 10}",
            f"{best.value:.4g}" if best.job else "",
            best.job,
        )
    out.print(table)
    return 0


def cmd_show(client: TuneforgeClient, args: argparse.Namespace) -> int:
    sweep = client.get_sweep(args.sweep)
    if args.json:
        print(json.dumps(MessageToDict(sweep), indent=2))
        return 0
    out.print(f"{sweep.name} {SWEEP.Name(sweep.state)}  worker time {sweep.worker_time_used.ToTimedelta()}")
    table = Table("trial", "state", "value", "evaluations", "parameters", "job")
    for trial in sweep.trials:
        params = ", ".join(f"{k}={_plain(v)}" for k, v in sorted(trial.params.items()))
        marker = " *" if sweep.best_trial.job and trial.number == sweep.best_trial.number else ""
        table.add_row(
            f"{trial.number}{marker}",
            TRIAL.Name(trial.state),
            f"{trial.value:.4g}",
            str(trial.evaluations),
            params,
            trial.job,
        )
    out.print(table)
    return 0


def cmd_watch(client: TuneforgeClient, args: argparse.Namespace) -> int:
    for event in client.watch_sweep(args.sweep):
        if args.json:
            print(json.dumps(MessageToDict(event)), flush=True)
        elif event.HasField("trial"):
            trial = event.trial
            console.print(f"trial {trial.number} {TRIAL.Name(trial.state)} value {trial.value:.4g} {trial.job}")
        elif event.HasField("best_trial"):
            console.print(f"best: trial {event.best_trial.number} = {event.best_trial.value:.4g}", style="green")
    sweep = client.get_sweep(args.sweep)
    if sweep.state != SWEEP.SUCCEEDED:
        console.print(f"{sweep.name} ended {SWEEP.Name(sweep.state)}: {sweep.error.message}", style="red")
        return 1
    print(sweep.best_trial.job)
    return 0


def cmd_cancel(client: TuneforgeClient, args: argparse.Namespace) -> int:
    sweep = client.cancel_sweep(args.sweep)
    print(f"{sweep.name} {SWEEP.Name(sweep.state)}")
    return 0


def add_sweep_commands(command: Command) -> None:
    """Registers the sweep commands on the CLI's sub-command factory."""
    created = command("sweep-create", cmd_create, "create a sweep from a SweepSpec JSON file (see examples/sweeps/)")
    add_spec_file_arguments(created, "SweepSpec", "examples/sweeps/")
    command("sweeps", cmd_list, "list sweeps, newest first")
    command("sweep", cmd_show, "show a sweep's trials").add_argument("sweep")
    command(
        "sweep-watch", cmd_watch, "follow a sweep; prints the best trial's job and exits 0 on SUCCEEDED"
    ).add_argument("sweep")
    command("sweep-cancel", cmd_cancel, "cancel a sweep and its running trials").add_argument("sweep")


def _plain(value: object) -> str:
    data = MessageToDict(value)  # type: ignore[arg-type]
    return f"{data:.3g}" if isinstance(data, float) else str(data)
