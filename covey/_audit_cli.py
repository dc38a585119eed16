"""`covey audit`: the privacy audit reports of a pod and of a training run.

Mounted by the root command line because it joins the facts of three packages: the pod
gathers its own (:func:`~covey.device._pod_audit.pod_audit`), the aggregator reads a
run's record and releases and the simulator trains the empirical replica
(:func:`covey.simulations.audit_run`); :mod:`covey.privacy` renders and
judges them and imports none of them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from covey.device import pod_audit
from covey.device.cli import open_pod
from covey.errors import InvalidInputError, RedFlagError
from covey.privacy import pod_report, write_report

__all__ = ["audit"]

out = Console()


def _progress() -> tuple[Any, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=Console(stderr=True), transient=True)
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    return bar, update


def audit(
    pod: Annotated[bool, typer.Option("--pod", help="Report on this device's pod.")] = False,
    run: Annotated[Path | None, typer.Option(
        "--run", help="Report on a training run: a run record, or a folder holding runs/ "
                      "(an aggregator home or a `covey simulate --out` folder).")] = None,
    out_path: Annotated[Path, typer.Option(
        "--out", help="Where to write the HTML report (the JSON goes beside it).")
    ] = Path("covey-audit.html"),
    home: Annotated[Path | None, typer.Option(
        "--home", envvar="COVEY_HOME", help="Pod home folder (with --pod).")] = None,
    empirical: Annotated[bool, typer.Option(
        help="With --run: canary clients (a one-run epsilon estimate), secret exposure and "
             "membership inference on a simulated replica of the run's mechanism, its own "
             "sampling and clipping (a few minutes).")] = True,
    strict: Annotated[bool, typer.Option(
        help="Exit non-zero (10) when the report raises any red flag.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Write a privacy audit report (self-contained HTML and the same content as JSON)."""
    if pod and run is None:
        with open_pod(home) as opened:
            report = pod_report(pod_audit(opened))
    elif run is not None and not pod:
        bar, update = _progress()
        with bar:
            # Imported here: the simulator's replica is not worth loading for every command.
            from covey.simulations import audit_run

            report = audit_run(run, empirical=empirical, progress=update)
    else:
        raise InvalidInputError("say which report: --pod, or --run DIR")
    html, json_path = write_report(report, out_path)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        flags = report["red_flags"]
        verdict = (f"[red]{len(flags)} red flag(s)[/]" if flags else "[green]no red flags[/]")
        out.print(f"{report['title']}: {verdict}")
        for f in flags:
            out.print(f"  [red]{f['code']}[/]: {f['message']}")
        out.print(f"wrote {html} and {json_path}")
    if strict and report["red_flags"]:
        raise RedFlagError(report["red_flags"])
