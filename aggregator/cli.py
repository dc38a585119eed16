"""`covey aggregator ...` and `covey train`: the operator's command line."""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from covey.aggregator._deploy import DEFAULT_PORT, AggregatorHome
from covey.errors import InvalidInputError

__all__ = ["aggregator_app", "train"]

aggregator_app = typer.Typer(help="Run the federated aggregator: certificates, SuperLink, "
                                  "admitted pods, model versions.", no_args_is_help=True)
out = Console()

HomeOpt = Annotated[
    Path, typer.Option("--home", envvar="COVEY_AGGREGATOR_HOME", show_envvar=True,
                       help="The aggregator's folder.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def _emit(value: Any, as_json: bool, text: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(value, indent=2) + "\n")
    else:
        out.print(text)


@aggregator_app.command("certs")
def certs(
    home: HomeOpt,
    host: Annotated[list[str] | None, typer.Option(
        "--host", help="A name or address pods use to reach the aggregator (repeatable; "
        "the loopback is always named too).")] = None,
    days: Annotated[int, typer.Option(help="Validity of the certificates.")] = 365,
    force: Annotated[bool, typer.Option(help="Replace existing certificates.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create the aggregator's CA and its TLS server certificate."""
    if days < 1:
        raise InvalidInputError("--days must be at least 1")
    root = AggregatorHome(home).make_certs(host, days, force)
    _emit({"root_cert": str(root)}, as_json, f"CA and server certificate written; pods "
          f"join with --root-cert {root}")


@aggregator_app.command("start")
def start(
    home: HomeOpt,
    host: Annotated[str, typer.Option(
        help="Address pods reach the aggregator on. Only the Fleet API listens there; the "
        "SuperLink itself, and its Control API, stay on the loopback.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The SuperLink's port.")] = DEFAULT_PORT,
    metrics_port: Annotated[int, typer.Option(
        help="Port of the Prometheus endpoint on 127.0.0.1 (0: any free port).")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Start the SuperLink (TLS, SuperNode authentication) and the metrics endpoint."""
    status = AggregatorHome(home).start(host, port, metrics_port)
    _emit(status, as_json, f"SuperLink on {status['superlink']} (pid "
          f"{status['pids']['superlink']}); metrics at {status['metrics']}")


@aggregator_app.command("stop")
def stop(home: HomeOpt, as_json: JsonOpt = False) -> None:
    """Stop every process `covey aggregator start` launched."""
    stopped = AggregatorHome(home).stop()
    _emit({"stopped": stopped}, as_json,
          f"Stopped: {', '.join(stopped)}" if stopped else "Nothing was running.")


@aggregator_app.command("status")
def status(home: HomeOpt, as_json: JsonOpt = False) -> None:
    """The SuperLink address, root certificate, admitted pods and the current model version."""
    info = AggregatorHome(home).status()
    if as_json:
        _emit(info, True, "")
        return
    table = Table(show_header=False, box=None)
    for key in ("superlink", "running", "root_cert", "signing_key", "metrics",
                "model_version"):
        table.add_row(key.replace("_", " "), str(info[key]))
    table.add_row("admitted pods", str(len(info["admitted"])))
    table.add_row("runs", str(len(info["runs"])))
    out.print(table)


@aggregator_app.command("admit")
def admit(
    public_key_file: Annotated[Path, typer.Argument(help="The pod's node key "
                                                    "(`covey pod status` shows it).")],
    home: HomeOpt,
    name: Annotated[str | None, typer.Option(help="A name for the pod.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a pod's node key so its SuperNode may connect."""
    info = AggregatorHome(home).admit(public_key_file, name)
    _emit(info, as_json, f"Admitted {public_key_file} as node {info['node_id']}")


@aggregator_app.command("versions")
def versions(home: HomeOpt, as_json: JsonOpt = False) -> None:
    """Every model version: id, parent, round, metrics, epsilon."""
    registry = AggregatorHome(home).registry()
    rows = [v.__dict__ for v in registry.versions()]
    current = registry.current_id
    if as_json:
        _emit({"current": current, "versions": rows}, True, "")
        return
    table = Table("", "version", "parent", "round", "perplexity", "epsilon", "created")
    for v in rows:
        table.add_row("*" if v["id"] == current else "", v["id"], str(v["parent"]),
                      str(v["round"]), f"{v['metrics'].get('perplexity', math.nan):.2f}",
                      f"{v['epsilon']:.3g}", v["created_at"])
    out.print(table)


@aggregator_app.command("rollback")
def rollback(
    version: Annotated[str, typer.Argument(help="The version to make current.")],
    home: HomeOpt,
    as_json: JsonOpt = False,
) -> None:
    """Make an earlier model version the current one (verified before it is activated)."""
    v = AggregatorHome(home).registry().activate(version)
    _emit({"current": v.id}, as_json, f"Current model version is now {v.id}")


def train(
    home: HomeOpt,
    rounds: Annotated[int, typer.Option(help="Rounds to run.")] = 3,
    target_epsilon: Annotated[float | None, typer.Option(
        help="Solve the noise multiplier for this epsilon over the run.")] = None,
    noise_multiplier: Annotated[float | None, typer.Option(
        help="Use this noise multiplier z instead of solving for a target.")] = None,
    mode: Annotated[str, typer.Option(help="central (the aggregator adds noise) or local "
                                           "(each pod does).")] = "central",
    clip_norm: Annotated[float, typer.Option(help="L2 clip norm C of a pod's update.")] = 1.0,
    sample_rate: Annotated[float, typer.Option(
        help="Probability a pod is sampled in a round (Poisson).")] = 1.0,
    delta: Annotated[float, typer.Option(help="The run's delta.")] = 1e-5,
    accountant: Annotated[str, typer.Option(help="rdp or prv.")] = "rdp",
    adaptive_quantile: Annotated[float, typer.Option(
        help="Adapt C toward this quantile of update norms (0: fixed C).")] = 0.0,
    min_pods: Annotated[int, typer.Option(help="Pods needed to start and per round.")] = 2,
    round_timeout: Annotated[float, typer.Option(help="Seconds to wait for replies.")] = 120.0,
    wait_timeout: Annotated[float, typer.Option(help="Seconds to wait for pods.")] = 60.0,
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = 1,
    lr: Annotated[float, typer.Option(help="Local learning rate.")] = 5e-3,
    precision: Annotated[str, typer.Option(
        help="Pods' training arithmetic: fp32, or bf16 (faster on CPUs with native bf16).")
    ] = "fp32",
    as_json: JsonOpt = False,
) -> None:
    """Run federated training rounds on the admitted pods and write a run record."""
    from covey.models import check_precision
    from covey.privacy import DPConfig

    if (target_epsilon is None) == (noise_multiplier is None):
        raise InvalidInputError("give exactly one of --target-epsilon and --noise-multiplier")
    try:
        dp = DPConfig(mode=mode, noise_multiplier=float(noise_multiplier or 0.0),  # type: ignore[arg-type]
                      clip_norm=clip_norm, sample_rate=sample_rate, delta=delta,
                      accountant=accountant)
        if rounds < 1:
            raise ValueError("--rounds must be at least 1")
        if target_epsilon is not None:
            dp = dp.solved(target_epsilon, rounds)
            noise_multiplier = dp.noise_multiplier
        if rounds < 1 or min_pods < 1:
            raise ValueError("--rounds and --min-pods must be at least 1")
        check_precision(precision)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None
    agg = AggregatorHome(home)
    run_name = f"run-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    config = {
        "run-name": run_name, "rounds": rounds, "mode": mode,
        "noise-multiplier": dp.noise_multiplier, "target-epsilon": target_epsilon or 0.0,
        "clip-norm": clip_norm, "sample-rate": sample_rate, "delta": delta,
        "accountant": accountant, "adaptive-quantile": adaptive_quantile,
        "min-pods": min_pods, "round-timeout": round_timeout, "wait-timeout": wait_timeout,
        "local-epochs": local_epochs, "lr": lr, "max-examples": 256, "precision": precision,
        "eval-examples": int(os.environ.get("COVEY_EVAL_EXAMPLES", "200")), "seed": 0,
    }
    if not as_json:
        out.print(f"Run {run_name}: {rounds} rounds, {mode} DP, z={dp.noise_multiplier:.4g}, "
                  f"C={clip_norm:g}, q={sample_rate:g}")
    record = agg.train(config, on_round=None if as_json else _print_round(rounds))
    check = record.get("epsilon_check", {})
    _emit(record, as_json, f"Done: epsilon {record['epsilon']:.4g} at delta {record['delta']:g} "
          f"({record['config']['dp']['accountant']}; {check.get('accountant', '-')} says "
          f"{check.get('epsilon', float('nan')):.4g}), model version "
          f"{record['final_version']}; record {record['record_path']}")


@aggregator_app.command("stats")
def stats(
    home: HomeOpt,
    noise_multiplier: Annotated[float, typer.Option(
        help="Each pod's noise multiplier z (noise std z*sqrt(2) per bin).")] = 8.0,
    min_pods: Annotated[int, typer.Option(help="Pods needed to answer.")] = 2,
    wait_timeout: Annotated[float, typer.Option(help="Seconds to wait for pods.")] = 60.0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for answers.")] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Ask the connected pods when they are used (hour of day), under local DP: each pod
    noises its own histogram and charges its ledger, or refuses."""
    if not noise_multiplier > 0 or min_pods < 1:
        raise InvalidInputError("--noise-multiplier must be > 0 and --min-pods >= 1")
    run_name = f"stats-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    config = {
        "task": "usage-stats", "run-name": run_name, "rounds": 1, "mode": "local",
        "noise-multiplier": noise_multiplier, "min-pods": min_pods,
        "round-timeout": timeout, "wait-timeout": wait_timeout,
    }
    record = AggregatorHome(home).train(config)
    peak = max(range(24), key=lambda h: record["mean_hours"][h]) if record["mean_hours"] \
        else None
    _emit(record, as_json, f"{record['answered']} of {record['asked']} pods answered "
          f"(refused: {record['refused'] or 'none'}); busiest hour {peak}; record "
          f"{record['record_path']}")


def _print_round(rounds: int) -> Any:
    def show(stats: dict[str, Any]) -> None:
        eps = stats.get("epsilon")
        rolled = f", rolled back to {stats['rolled_back_to']}" if "rolled_back_to" in stats \
            else ""
        out.print(f"  round {stats['round']}/{rounds}: {stats['accepted']} updates, "
                  f"{sum(stats['rejected'].values())} rejected, "
                  f"{sum(stats['refused'].values())} refused, perplexity "
                  f"{stats.get('perplexity', float('nan')):.2f}, epsilon "
                  f"{'n/a' if eps is None else f'{eps:.4g}'}, {stats['seconds']:.1f} s{rolled}")
    return show
