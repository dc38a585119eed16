"""`covey simulate`: federated runs over the dataset's users, on this machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

__all__ = ["simulate"]

out = Console()


def simulate(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the run record, "
                                          "registry and population summary.")],
    pods: Annotated[int, typer.Option(help="Pods (0: every federated user with enough "
                                           "messages).")] = 0,
    min_messages: Annotated[int, typer.Option(help="Least training messages a user needs "
                                                   "to be a pod.")] = 2,
    rounds: Annotated[int, typer.Option(help="Rounds.")] = 10,
    clients_per_round: Annotated[int, typer.Option(help="Expected pods per round "
                                                        "(Poisson sampling).")] = 10,
    target_epsilon: Annotated[float, typer.Option(help="User-level epsilon of the whole "
                                                       "run (inf: no DP).")] = 8.0,
    mode: Annotated[str, typer.Option(help="central or local DP.")] = "central",
    clip_norm: Annotated[float, typer.Option(help="L2 clip norm C.")] = 1.0,
    delta: Annotated[float, typer.Option(help="delta (0: a tenth of 1/pods).")] = 0.0,
    engine: Annotated[str, typer.Option(help="fast (in-process).")] = "fast",
    lr: Annotated[float, typer.Option(help="Local learning rate.")] = 5e-3,
    local_epochs: Annotated[int, typer.Option(help="Local epochs.")] = 1,
    eval_examples: Annotated[int, typer.Option(help="Federated test messages evaluated "
                                                    "each round.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of sampling, training and noise.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out "
                                               "(same settings).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run record.")] = False,
) -> None:
    """Simulate federated training with the dataset's users as pods; writes a run record."""
    from covey.simulations._simulate import SimulationConfig
    from covey.simulations._simulate import simulate as run

    cfg = SimulationConfig(pods=pods, min_messages=min_messages, rounds=rounds,
                           clients_per_round=clients_per_round, target_epsilon=target_epsilon,
                           mode=mode, clip_norm=clip_norm, delta=delta, lr=lr,
                           local_epochs=local_epochs, eval_examples=eval_examples, seed=seed,
                           engine=engine)

    def show(stats: dict[str, Any]) -> None:
        if not as_json:
            eps = stats.get("epsilon")
            out.print(f"  round {stats['round']}/{rounds}: {stats['accepted']} updates, "
                      f"perplexity {stats.get('perplexity', float('nan')):.2f}, top-1 "
                      f"{stats.get('top1', float('nan')):.3f}, epsilon "
                      f"{'inf' if eps is None else f'{eps:.3g}'}, {stats['seconds']:.1f} s")

    record = run(cfg, out_dir, on_round=show, resume=resume)
    if as_json:
        sys.stdout.write(json.dumps(record, indent=2) + "\n")
        return
    sim = record["simulation"]
    base = sim["base_metrics"]["perplexity"]
    last = record["rounds"][-1].get("perplexity", float("nan"))
    out.print(f"{sim['population']['users']} pods, {sim['client_updates']} client updates in "
              f"{sim['seconds']:.1f} s ({sim['updates_per_second']:.2f}/s); perplexity "
              f"{base:.2f} -> {last:.2f}; epsilon {record['epsilon']} at delta "
              f"{record['delta']:.2g}; record {record['record_path']}")
