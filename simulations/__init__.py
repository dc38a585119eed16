"""Simulations and benchmarks: populations, engines, sweeps, plots, the audit's replica.

Public surface (imported when first used):
    seed_pods    real pods seeded with simulated users' conversations (the demo's)
    audit_run    a run's audit report, with the empirical tests on a replica of its run

Benchmarks run with ``make bench`` (``python -m covey.simulations.bench``).
"""

from typing import TYPE_CHECKING, Any

from covey._lazy import lazy_attribute

# Imported when first used, so that importing the package stays light.
_LAZY = {
    "audit_run": "_replica",
    "seed_pods": "_seeding",
}

if TYPE_CHECKING:
    from covey.simulations._replica import audit_run as audit_run
    from covey.simulations._seeding import seed_pods as seed_pods


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _LAZY, name, globals())


__all__ = sorted(_LAZY)
