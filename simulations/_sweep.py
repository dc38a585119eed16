"""Privacy-utility sweeps: one simulation per epsilon, with baselines, as a table,
figures (PNG) and a small HTML page.

Baselines in the same harness and on the same evaluation messages: the base model
without federated training, local-only fine-tuning (each evaluated user trains the
adapter on their own messages alone), non-private FedAvg (epsilon inf) and DP-FedAvg at
each epsilon. The share of the non-private improvement that survives at an epsilon is
(base - dp) / (base - fedavg) in perplexity.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from covey.simulations._config import SimulationConfig
from covey.simulations._personalize import personalized
from covey.simulations._population import population
from covey.simulations._simulate import simulate

__all__ = ["parse_epsilons", "sweep"]


def parse_epsilons(text: str) -> list[float]:
    """``"1,2,4,8,inf"`` -> [1.0, 2.0, 4.0, 8.0, inf] (raises ValueError)."""
    values = [float(part) for part in text.split(",") if part.strip()]
    if not values or any(not v > 0 for v in values):
        raise ValueError("epsilons are positive numbers or inf, separated by commas")
    return sorted(set(values))


def _final_metrics(out: Path, record: dict[str, Any]) -> dict[str, float]:
    from covey.aggregator import Registry

    version, _, _ = Registry(out / "registry").get(record["final_version"])
    return dict(version.metrics)


def _figures(out: Path, table: list[dict[str, Any]], curves: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in table if r["method"] == "base model")["perplexity"]
    fedavg = next((r for r in table if r["method"] == "FedAvg (no DP)"), None)
    dp = [r for r in table if r["method"].startswith("DP-FedAvg")]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if dp:
        ax.plot([r["epsilon"] for r in dp], [r["perplexity"] for r in dp], "o-",
                label="DP-FedAvg")
        ax.set_xscale("log")
    ax.axhline(base, color="grey", linestyle="--", label="base model")
    if fedavg:
        ax.axhline(fedavg["perplexity"], color="green", linestyle=":", label="FedAvg (no DP)")
    ax.set_xlabel("user-level epsilon")
    ax.set_ylabel("perplexity (federated test messages)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "utility_vs_epsilon.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, label=label)
    ax.axhline(base, color="grey", linestyle="--", label="base model")
    ax.set_xlabel("round")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("perplexity of the round's version")
    finite = [v for values in curves.values() for v in values if math.isfinite(v)]
    if finite and max(finite) > 10 * min(finite):
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "utility_vs_rounds.png", dpi=110)
    plt.close(fig)


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>covey sweep</title>
<style>body{font-family:sans-serif;max-width:52em;margin:2em auto}td,th{padding:.2em .6em;
text-align:right}th:first-child,td:first-child{text-align:left}</style></head><body>
<h1>Privacy-utility sweep</h1>
<p>{{ population.users }} pods, {{ rounds }} rounds, {{ clients }} expected pods per round,
{{ mode }} DP, delta {{ "%.2g"|format(delta) }}. Evaluation: {{ eval }} federated test
messages (the same for every row).</p>
<table><tr><th>method</th><th>epsilon</th><th>perplexity</th><th>top-1</th><th>top-3</th>
<th>non-private improvement kept</th><th>personalized perplexity</th></tr>
{% for r in table %}<tr><td>{{ r.method }}</td><td>{{ r.epsilon_text }}</td>
<td>{{ "%.2f"|format(r.perplexity) }}</td><td>{{ "%.3f"|format(r.top1) }}</td>
<td>{{ "%.3f"|format(r.top3) }}</td><td>{{ r.kept_text }}</td>
<td>{{ "%.2f"|format(r.personalized_perplexity) if r.personalized_perplexity else "-" }}</td></tr>
{% endfor %}</table>
<p><img src="utility_vs_epsilon.png" alt="utility against epsilon">
<img src="utility_vs_rounds.png" alt="utility against rounds"></p></body></html>
"""


def sweep(cfg: SimulationConfig, epsilons: Sequence[float], out: Path,
          on_run: Callable[[str], None] | None = None,
          on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the grid and the baselines; writes sweep.json, sweep.html and two PNGs."""
    import jinja2

    out.mkdir(parents=True, exist_ok=True)
    say = on_run or (lambda _: None)
    runs: dict[float, dict[str, Any]] = {}
    for eps in sorted(epsilons, reverse=True):
        say(f"epsilon {eps:g}")
        folder = out / ("eps-inf" if math.isinf(eps) else f"eps-{eps:g}")
        record = simulate(replace(cfg, target_epsilon=eps), folder, on_round=on_round)
        runs[eps] = {"record": record["record_path"], "final": _final_metrics(folder, record),
                     "base": record["simulation"]["base_metrics"],
                     "personalized": record["simulation"]["personalized_metrics"],
                     "curve": [r.get("perplexity", math.nan) for r in record["rounds"]],
                     "epsilon": record["epsilon"], "noise_multiplier":
                     record["config"]["dp"]["noise_multiplier"],
                     "population": record["simulation"]["population"],
                     "delta": record["delta"]}
    say("local-only fine-tuning")
    local = personalized(cfg, population(cfg), None)
    first = next(iter(runs.values()))
    base = first["base"]
    table: list[dict[str, Any]] = [{"method": "base model", "epsilon": 0.0, **base},
                                   {"method": "local-only fine-tuning", "epsilon": 0.0,
                                    **local}]
    fedavg = runs.get(math.inf)
    if fedavg:
        table.append({"method": "FedAvg (no DP)", "epsilon": math.inf, **fedavg["final"],
                      "personalized_perplexity": fedavg["personalized"]["perplexity"]})
    for eps in sorted(e for e in runs if math.isfinite(e)):
        table.append({"method": f"DP-FedAvg eps={eps:g}", "epsilon": eps,
                      "spent": runs[eps]["epsilon"], **runs[eps]["final"],
                      "personalized_perplexity": runs[eps]["personalized"]["perplexity"]})
    gain = (base["perplexity"] - fedavg["final"]["perplexity"]) if fedavg else math.nan
    for row in table:
        kept = (base["perplexity"] - row["perplexity"]) / gain if gain and gain > 0 else None
        row["kept"] = None if kept is None or math.isnan(kept) else round(kept, 4)
        row["kept_text"] = "-" if row["kept"] is None else f"{100 * row['kept']:.0f} %"
        row["epsilon_text"] = ("-" if row["method"] in ("base model", "local-only fine-tuning")
                               else "inf" if math.isinf(row["epsilon"]) else
                               f"{row['epsilon']:g}")
    curves = {("no DP" if math.isinf(e) else f"eps={e:g}"): r["curve"] for e, r in runs.items()}
    _figures(out, table, curves)
    result = {"config": {**cfg.__dict__, "epsilons": [str(e) for e in sorted(epsilons)]},
              "population": first["population"], "delta": first["delta"], "table": table,
              "runs": {("inf" if math.isinf(e) else f"{e:g}"): {k: v for k, v in r.items()
                                                              if k != "curve"}
                       for e, r in runs.items()},
              "curves": curves}
    (out / "sweep.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    page = jinja2.Environment(autoescape=True).from_string(_PAGE).render(
        table=table, population=first["population"], rounds=cfg.rounds,
        clients=cfg.clients_per_round, mode=cfg.mode, delta=first["delta"],
        eval=cfg.eval_examples)
    (out / "sweep.html").write_text(page)
    return result
