"""Run covey's benchmarks and write one JSON file per benchmark.

Usage: ``python -m covey.simulations.bench [--only NAME ...] [--quick] [--out DIR]``.
Results go to ``bench/results/<name>.json`` under the current directory by default.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from covey.simulations.bench import BENCHMARKS

DEFAULT_OUT = Path("bench") / "results"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m covey.simulations.bench", description="Run covey's benchmarks."
    )
    parser.add_argument(
        "--only", action="extend", nargs="+", choices=sorted(BENCHMARKS), metavar="NAME",
        help=f"run only these benchmarks (of: {', '.join(sorted(BENCHMARKS))})",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"folder for the JSON results (default {DEFAULT_OUT})")
    return parser.parse_args(argv)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "cpu_count": os.cpu_count(),
    }


def run_one(name: str, quick: bool, out: Path) -> Path:
    """Run one benchmark, print its summary and write its JSON; returns the file written."""
    print(f"== {name}{' (quick)' if quick else ''}", flush=True)
    created_at = datetime.now(UTC).isoformat(timespec="seconds")
    started = time.perf_counter()
    outcome = BENCHMARKS[name](quick)
    elapsed = time.perf_counter() - started
    for line in outcome.get("summary", []):
        print(f"  {line}", flush=True)
    document = {
        "benchmark": name,
        "created_at": created_at,
        "machine": machine(),
        "config": {"quick": quick, **outcome["config"]},
        "results": outcome["results"],
        "elapsed_s": round(elapsed, 2),
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"  -> {path} ({elapsed:.1f} s)", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks; exit code 1 when any of them failed."""
    args = _parse(argv)
    names = list(dict.fromkeys(args.only)) if args.only else list(BENCHMARKS)
    failed: list[str] = []
    for name in names:
        try:
            run_one(name, args.quick, args.out)
        except Exception:
            # One broken benchmark should not hide the figures of the others.
            traceback.print_exc()
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
