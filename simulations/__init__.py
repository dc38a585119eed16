"""Simulations and benchmarks: populations, engines, sweeps, plots.

Benchmarks run with ``make bench`` (``python -m covey.simulations.bench``).
"""

__all__: list[str] = []
