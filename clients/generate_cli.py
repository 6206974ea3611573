"""`tuneforge generate` and `tuneforge chat`: a generative job's answers printed as the model writes them."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from tuneforge.clients.client import TuneforgeClient
from tuneforge.clients.sweep_cli import Command
from tuneforge.v1 import jobs_pb2

FINISH = jobs_pb2.GenerateResponse.FinishReason
EXIT_WORDS = ("/exit", "/quit")


def _write(
    client: TuneforgeClient,
    args: argparse.Namespace,
    output: TextIO,
    prompt: str = "",
    messages: list[tuple[str, str]] | None = None,
) -> tuple[str, jobs_pb2.GenerateResponse]:
    """Streams one answer to `output` (unless --json) and returns its text and last message."""
    pieces = client.generate(
        args.job,
        prompt=prompt,
        messages=messages or [],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        stop=args.stop,
        seed=args.seed,
        checkpoint=args.checkpoint,
    )
    text, last = "", jobs_pb2.GenerateResponse()
    for piece in pieces:
        text += piece.text
        last = piece
        if not args.json:
            output.write(piece.text)
            output.flush()
    return text, last


def cmd_generate(client: TuneforgeClient, args: argparse.Namespace) -> int:
    """Continues the prompt (or, with --chat, answers it as a user's message) and prints tokens as they come."""
    messages = None
    if args.chat or args.system:
        messages = ([("system", args.system)] if args.system else []) + [("user", args.prompt)]
    text, last = _write(client, args, sys.stdout, "" if messages else args.prompt, messages)
    if args.json:
        reason = FINISH.Name(last.finish_reason).lower()
        counts = {"prompt_tokens": last.prompt_tokens, "generated_tokens": last.generated_tokens}
        print(json.dumps({"text": text, "finish_reason": reason, **counts}))
    else:
        print()
    return 0


def cmd_chat(client: TuneforgeClient, args: argparse.Namespace) -> int:
    """A conversation on standard input: each line is the user's message; the whole conversation goes with each
    call, so the model answers in context. An empty line is skipped; /exit or end of input ends it."""
    messages: list[tuple[str, str]] = [("system", args.system)] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in EXIT_WORDS:
            return 0
        if not line.strip():
            continue
        messages.append(("user", line.rstrip("\n")))
        if not args.json:
            print("model> ", end="", flush=True)
        text, last = _write(client, args, sys.stdout, messages=messages)
        messages.append(("assistant", text))
        if args.json:
            print(json.dumps({"text": text, "finish_reason": FINISH.Name(last.finish_reason).lower()}), flush=True)
        else:
            print(flush=True)


def _decoding_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="tokens to write at most (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; up to 2: sampling")
    parser.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling (0 or 1: off)")
    parser.add_argument("--stop", action="append", default=[], help="a string that ends the answer (repeatable)")
    parser.add_argument("--seed", type=int, help="makes sampling repeatable")
    parser.add_argument("--system", default="", help="a system message to start the conversation with")
    parser.add_argument("--checkpoint", default="", help="latest or step-N of a running or paused job")


def add_generate_commands(command: Command) -> None:
    """Registers `generate` and `chat` on the CLI's sub-command factory."""
    generate = command("generate", cmd_generate, "print a generative job's continuation of a prompt as it is written")
    _decoding_arguments(generate)
    generate.add_argument("prompt")
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user's chat message")
    _decoding_arguments(command("chat", cmd_chat, "talk with a generative job's model, a line per message"))
