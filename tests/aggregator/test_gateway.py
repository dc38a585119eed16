"""The Fleet gateway relays the Fleet API and the health check, and nothing else."""

from __future__ import annotations

import pytest

from covey.aggregator._gateway import FLEET_ROUTES, allowed


def test_every_fleet_route_is_relayed() -> None:
    for route in FLEET_ROUTES:
        assert allowed("POST", f"/v1/fleet/{route}") == f"/v1/fleet/{route}"
    assert allowed("GET", "/health") == "/health"


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/control/start-run"),
    ("POST", "/v1/control/list-runs"),
    ("POST", "/v1/control/register-node"),
    ("POST", "/v1/fleet/../control/start-run"),
    ("POST", "/v1/fleet/pull-messages/../../control/start-run"),
    ("POST", "/v1/fleet/"),
    ("POST", "/v1/fleet"),
    ("GET", "/v1/fleet/pull-messages"),
    ("POST", "/health"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("POST", "/v1/runtime/push-messages"),
])
def test_anything_else_is_not(method: str, path: str) -> None:
    assert allowed(method, path) is None
