"""`covey chat` and `covey feedback`: talking to the pod."""

from __future__ import annotations

import json
import sys
import threading
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from covey.device.assistant._chat import Assistant, open_assistant
from covey.device.assistant._feedback import give_feedback
from covey.device.cli._pod import HomeOpt, JsonOpt, open_pod
from covey.errors import InvalidInputError
from covey.models import SamplingParams

__all__ = ["chat", "feedback"]

out = Console()
err = Console(stderr=True)
HELP = "/why explains the last reply, /forget erases what you just said, /new, /quit"


def _print_explanation(info: dict[str, Any]) -> None:
    table = Table(title=f"why reply #{info['message_id']}", show_header=False)
    for memory in info.get("memories", []):
        table.add_row("memory", f"#{memory['id']} {memory.get('text', '')}",
                      f"{memory['score']:.4f}")
    for pref in info.get("preferences", []):
        table.add_row("preference", pref, "")
    for fact in info.get("learned", []):
        table.add_row("learned", fact, "")
    table.add_row("recent turns", str(info.get("turns", 0)), "")
    table.add_row("tokens", json.dumps(info.get("tokens", {})), "")
    out.print(table)


def _one_turn(assistant: Assistant, session: str, text: str, stream: bool) -> dict[str, Any]:
    cancel = threading.Event()
    turn = assistant.respond(session, text, cancel=cancel)
    try:
        for piece in turn.pieces:
            if stream:
                out.print(piece, end="", markup=False, highlight=False)
    except KeyboardInterrupt:
        cancel.set()
        for _ in turn.pieces:  # the model stops at its next token: the reply is partial
            pass
    turn.finish()  # the reply is stored, partial or whole
    if stream:
        out.print()
    return {"session": session, "message_id": turn.reply_message_id, "reply": turn.text,
            "learned": turn.explanation.learned, "timings": turn.timings}


def chat(
    message: Annotated[str | None, typer.Argument(
        help="One message; without it, chat interactively.")] = None,
    home: HomeOpt = None,
    explain: Annotated[bool, typer.Option("--explain", help="Show why the reply was given.")
                       ] = False,
    session: Annotated[str | None, typer.Option(help="Continue this session.")] = None,
    new: Annotated[bool, typer.Option("--new", help="Start a new session.")] = False,
    generator: Annotated[str | None, typer.Option(
        help="onnx (default), torch, or openai (with --url).")] = None,
    url: Annotated[str | None, typer.Option(help="OpenAI-compatible server URL.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible replies.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Chat with your pod: it answers on-device and remembers what you tell it."""
    from covey.device._stop import running

    with open_pod(home) as pod, running(pod.home, "chat"):
        assistant = open_assistant(pod, generator, url, progress=err.print)
        if seed is not None:
            assistant.config = type(assistant.config)(
                sampling=SamplingParams(max_tokens=48, seed=seed))
        current = session or (None if new else assistant.last_session())
        if current is None or (message is None and session is None):
            current = assistant.new_session()
        if message is not None:
            result = _one_turn(assistant, current, message, stream=not as_json)
            if explain:
                result["explanation"] = assistant.explain(result["message_id"])
            if as_json:
                sys.stdout.write(json.dumps(result, ensure_ascii=False, indent=2) + "\n")
            elif explain:
                _print_explanation(result["explanation"])
            return
        _interactive(assistant, current, explain)


def _interactive(assistant: Assistant, session: str, explain: bool) -> None:
    if not sys.stdin.isatty():
        raise InvalidInputError("interactive chat needs a terminal; pass a MESSAGE instead")
    err.print(f"[dim]session {session} · {HELP}[/]")
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.print()
            return
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/why":
            _print_explanation(assistant.explain())
            continue
        if text == "/forget":
            erased = assistant.forget_last_message()
            out.print(f"[yellow]forgot your last message ({erased} messages erased)[/]")
            continue
        if text == "/new":
            session = assistant.new_session()
            err.print(f"[dim]new session {session}[/]")
            continue
        out.print("pod> ", end="")
        result = _one_turn(assistant, session, text, stream=True)
        for fact in result["learned"]:
            err.print(f"[dim]remembered: {fact}[/]", markup=True, highlight=False)
        if explain:
            _print_explanation(assistant.explain(result["message_id"]))


def feedback(
    up: Annotated[bool, typer.Option("--up", help="The last reply was good.")] = False,
    down: Annotated[bool, typer.Option("--down", help="The last reply was bad.")] = False,
    correct: Annotated[str | None, typer.Option(
        "--correct", help="What the reply should have been.")] = None,
    message: Annotated[int | None, typer.Option(help="A reply id (default: the last).")
                       ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Rate or correct a reply; good replies and corrections become training examples."""
    if up + down + (correct is not None) != 1:
        raise InvalidInputError("give exactly one of --up, --down or --correct TEXT")
    rating = 1 if up else -1 if down else None
    with open_pod(home) as pod:
        result = give_feedback(pod, rating=rating, correction=correct, message_id=message)
    if as_json:
        sys.stdout.write(json.dumps(result.__dict__) + "\n")
        return
    note = ("a training example (consented)" if result.example_id and result.consented else
            "a training example (not used for federated training until you consent:"
            " covey pod consent federated_training --grant)" if result.example_id else
            "stored")
    out.print(f"Feedback on reply #{result.message_id}: {note}")
