"""`covey simulate` and `covey simulate sweep`: federated runs over the dataset's users."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from covey.errors import InvalidInputError

__all__ = ["simulate_app"]

out = Console()
simulate_app = typer.Typer(
    help="Simulate federated training with the dataset's users as pods.",
    invoke_without_command=True)

OutOpt = Annotated[Path | None, typer.Option(
    "--out", help="Folder for run records, registry, population summary (and sweep files).")]
PodsOpt = Annotated[int, typer.Option(help="Pods (0: every federated user with enough "
                                           "messages).")]
MinOpt = Annotated[int, typer.Option(help="Least training messages a user needs to be a pod.")]
RoundsOpt = Annotated[int, typer.Option(help="Rounds.")]
ClientsOpt = Annotated[int, typer.Option(help="Expected pods per round (Poisson sampling).")]
ModeOpt = Annotated[str, typer.Option(help="central or local DP.")]
ClipOpt = Annotated[float, typer.Option(help="L2 clip norm C.")]
DeltaOpt = Annotated[float, typer.Option(help="delta (0: a tenth of 1/pods).")]
EngineOpt = Annotated[str, typer.Option(help="fast (in-process) or flower (Flower's Simulation "
                                              "Runtime on Ray).")]
LrOpt = Annotated[float, typer.Option(help="Local learning rate.")]
EpochsOpt = Annotated[int, typer.Option(help="Local epochs.")]
EvalOpt = Annotated[int, typer.Option(help="Federated test messages evaluated each round.")]
SeedOpt = Annotated[int | None, typer.Option(
    help="Make the run reproducible: pods, sampling, training and the DP noise all derive "
         "from this seed. Anyone who knows it can remove the noise, so the run record says "
         "the run is not private. Without it the noise comes from the OS's CSPRNG.")]
WorkersOpt = Annotated[int, typer.Option(help="Processes that train pods (0: one per core).")]
PrecisionOpt = Annotated[str, typer.Option(
    help="Pods' training arithmetic: fp32, bf16, or auto (bf16 where the CPU has it natively).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def _config(**kwargs: Any) -> Any:
    from covey.simulations._config import SimulationConfig

    return SimulationConfig(**kwargs)


def _show(rounds: int, as_json: bool) -> Any:
    def show(stats: dict[str, Any]) -> None:
        if not as_json:
            eps = stats.get("epsilon")
            out.print(f"  round {stats['round']}/{rounds}: {stats['accepted']} updates, "
                      f"perplexity {stats.get('perplexity', float('nan')):.2f}, top-1 "
                      f"{stats.get('top1', float('nan')):.3f}, epsilon "
                      f"{'inf' if eps is None else f'{eps:.3g}'}, {stats['seconds']:.1f} s")
    return show


@simulate_app.callback()
def simulate(
    ctx: typer.Context,
    out_dir: OutOpt = None,
    pods: PodsOpt = 0,
    min_messages: MinOpt = 2,
    rounds: RoundsOpt = 10,
    clients_per_round: ClientsOpt = 10,
    target_epsilon: Annotated[float, typer.Option(help="User-level epsilon of the whole "
                                                       "run (inf: no DP).")] = 8.0,
    mode: ModeOpt = "central",
    clip_norm: ClipOpt = 1.0,
    delta: DeltaOpt = 0.0,
    engine: EngineOpt = "fast",
    lr: LrOpt = 5e-3,
    local_epochs: EpochsOpt = 1,
    eval_examples: EvalOpt = 300,
    seed: SeedOpt = None,
    workers: WorkersOpt = 0,
    precision: PrecisionOpt = "auto",
    encrypted_pods: Annotated[bool, typer.Option(
        help="Give each pod a real encrypted store (fast engine), to measure its cost.")
    ] = False,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out "
                                               "(same settings).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Simulate federated training with the dataset's users as pods; writes a run record."""
    if ctx.invoked_subcommand is not None:
        return
    if out_dir is None:
        raise InvalidInputError("--out DIR is required")
    from covey.simulations._simulate import simulate as run

    cfg = _config(pods=pods, min_messages=min_messages, rounds=rounds,
                  clients_per_round=clients_per_round, target_epsilon=target_epsilon,
                  mode=mode, clip_norm=clip_norm, delta=delta, lr=lr,
                  local_epochs=local_epochs, eval_examples=eval_examples, seed=seed,
                  engine=engine, workers=workers, encrypted_pods=encrypted_pods,
                  precision=precision)
    record = run(cfg, out_dir, on_round=_show(rounds, as_json), resume=resume)
    if as_json:
        sys.stdout.write(json.dumps(record, indent=2) + "\n")
        return
    sim = record["simulation"]
    base = sim["base_metrics"]["perplexity"]
    last = record["rounds"][-1].get("perplexity", float("nan"))
    final = sim["global_metrics"]["perplexity"]
    personal = sim["personalized_metrics"]["perplexity"]
    out.print(f"{sim['population']['users']} pods, {sim['client_updates']} client updates in "
              f"{sim['seconds']:.1f} s ({sim['updates_per_second']:.2f}/s); perplexity: base "
              f"{base:.2f}, last round {last:.2f}, global model {final:.2f}, personalized "
              f"{personal:.2f}; epsilon {record['epsilon']} at delta {record['delta']:.2g}; "
              f"record {record['record_path']}")


@simulate_app.command("sweep")
def sweep(
    out_dir: OutOpt = None,
    epsilons: Annotated[str, typer.Option(help="Comma-separated epsilons; inf is "
                                               "non-private FedAvg.")] = "1,2,4,8,inf",
    pods: PodsOpt = 0,
    min_messages: MinOpt = 2,
    rounds: RoundsOpt = 10,
    clients_per_round: ClientsOpt = 10,
    mode: ModeOpt = "central",
    clip_norm: ClipOpt = 1.0,
    delta: DeltaOpt = 0.0,
    engine: EngineOpt = "fast",
    lr: LrOpt = 5e-3,
    local_epochs: EpochsOpt = 1,
    eval_examples: EvalOpt = 300,
    seed: SeedOpt = None,
    workers: WorkersOpt = 0,
    precision: PrecisionOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Run one simulation per epsilon plus baselines; write a table, figures and HTML."""
    if out_dir is None:
        raise InvalidInputError("--out DIR is required")
    from covey.simulations._sweep import parse_epsilons
    from covey.simulations._sweep import sweep as run

    try:
        grid = parse_epsilons(epsilons)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None
    cfg = _config(pods=pods, min_messages=min_messages, rounds=rounds,
                  clients_per_round=clients_per_round, target_epsilon=grid[0], mode=mode,
                  clip_norm=clip_norm, delta=delta, lr=lr, local_epochs=local_epochs,
                  eval_examples=eval_examples, seed=seed, engine=engine, workers=workers,
                  precision=precision)
    result = run(cfg, grid, out_dir, on_run=None if as_json else
                 (lambda text: out.print(f"[bold]{text}[/]")),
                 on_round=_show(rounds, as_json))
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
        return
    for row in result["table"]:
        out.print(f"  {row['method']:<24} perplexity {row['perplexity']:8.2f}  top-1 "
                  f"{row['top1']:.3f}  kept {row['kept_text']}")
    out.print(f"wrote {out_dir / 'sweep.html'}, {out_dir / 'sweep.json'} and two figures")
