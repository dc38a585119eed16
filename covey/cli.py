"""The root command line: mounts each package's commands and turns errors into one line."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import click
import typer

import covey
from covey import logs
from covey._audit_cli import audit
from covey.aggregator.cli import aggregator_app, train
from covey.device.cli import (
    chat,
    context_app,
    feedback,
    memory_app,
    pod_app,
    serve,
    stop_command,
    sync_app,
)
from covey.errors import CoveyError
from covey.models.cli import models_app
from covey.privacy import RedactingFilter
from covey.simulations.cli import simulate_app

__all__ = ["app", "main"]

app = typer.Typer(
    name="covey",
    help="covey: a federated, privacy-first assistant whose data never leaves your devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(pod_app, name="pod")
app.add_typer(memory_app, name="memory")
app.add_typer(models_app, name="models")
app.add_typer(aggregator_app, name="aggregator")
app.command("train")(train)
app.add_typer(simulate_app, name="simulate")
app.command("chat")(chat)
app.command("feedback")(feedback)
app.command("serve")(serve)
app.add_typer(sync_app, name="sync")
app.add_typer(context_app, name="context")
app.command("stop")(stop_command)
app.command("audit")(audit)

_log = logging.getLogger(logs.CRASH_LOGGER)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"covey {covey.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """covey: a federated, privacy-first assistant whose data never leaves your devices."""


@app.command("demo")
def demo() -> None:
    """The main job, end to end, on the embedded default (a throwaway pod)."""
    from covey._demo import run

    run()


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `covey` console script."""
    from covey._processes import take_secrets

    take_secrets()
    logs.configure(None, redaction=RedactingFilter)
    try:
        result = app(args=argv, prog_name="covey", standalone_mode=False)
    except CoveyError as exc:
        _fail(str(exc), exc.exit_code)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except click.ClickException as exc:
        _fail(exc.format_message().splitlines()[0], exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:
        # The traceback goes to the (redacted) log file, never to the terminal.
        _log.error("internal error", exc_info=True)
        _fail(f"internal error ({type(exc).__name__}); details are in the log", 70)
    sys.exit(result if isinstance(result, int) else 0)
