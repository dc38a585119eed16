"""covey's app, its signature and the loopback app hub, checked with Flower's own code:
the request the SuperLink makes for a named app (``request_download_link``), the record
it builds from the answer (``_format_verification``) and the SuperNode's check against
its trusted entities (``_verify_fab``)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import requests
import yaml
from flwr.supercore.fab import Fab
from flwr.supercore.utils import parse_app_spec, request_download_link
from flwr.superlink.servicer.control.control_handlers import _format_verification
from flwr.supernode.start_client_internal import _verify_fab

from covey._processes import free_port
from covey.aggregator import _apphub
from covey.aggregator._apphub import AppHub
from covey.aggregator._deploy import AggregatorError
from covey.aggregator._registry import Registry
from covey.protocols._trusted_app import trusted_entities


def _fab_as_the_superlink_gets_it(hub: AppHub, spec: str) -> Fab:
    app_id, version = parse_app_spec(spec)
    url, verifications, _ = request_download_link(
        app_id, version, f"http://127.0.0.1:{hub.port}/hub/fetch-fab", "fab_url")
    content = requests.get(url, timeout=10).content
    assert verifications is not None
    return Fab(hashlib.sha256(content).hexdigest(), content,
               _format_verification(verifications))


def test_the_hub_serves_covey_app_signed_so_that_only_its_pinned_key_verifies(
        tmp_path: Path) -> None:
    registry, other = Registry(tmp_path / "registry"), Registry(tmp_path / "other")
    pinned = yaml.safe_load(trusted_entities(registry.public_key))
    with AppHub(registry, free_port()) as hub:
        assert hub.spec == "@covey/covey-federated==1.0.0"
        fab = _fab_as_the_superlink_gets_it(hub, hub.spec)
        assert fab.content == hub.fab
        assert _verify_fab(fab, pinned)
        # a pod that pinned another aggregator's key refuses it
        assert not _verify_fab(fab, yaml.safe_load(trusted_entities(other.public_key)))
        # one byte changed in the app, the same signature: refused
        tampered = fab.content[:-1] + bytes([fab.content[-1] ^ 1])
        assert not _verify_fab(Fab(hashlib.sha256(tampered).hexdigest(), tampered,
                                   fab.verifications), pinned)
        # the hub serves covey's app and nothing else
        for spec in ("@mallory/helpful-stats==1.0.0", "@covey/covey-federated==9.9.9"):
            with pytest.raises(ValueError, match="not found"):
                _fab_as_the_superlink_gets_it(hub, spec)
    # a signature made by another key under covey's key id does not verify either
    forged = Fab(fab.hash_str, fab.content, _format_verification(
        [{**other.sign_app(fab.content), "public_key_id": next(iter(pinned))}]))
    assert not _verify_fab(forged, pinned)


def test_a_port_that_stays_taken_is_one_clear_error(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_apphub, "_BUSY", 0.5)
    registry = Registry(tmp_path / "registry")
    port = free_port()
    with AppHub(registry, port), pytest.raises(AggregatorError, match="stays taken"), \
            AppHub(registry, port):
        pass


def test_a_second_submission_waits_for_the_port(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    port = free_port()
    first = AppHub(registry, port).__enter__()
    threading.Timer(0.5, first.__exit__).start()  # the first `covey train` is done
    with AppHub(registry, port) as second:
        assert _fab_as_the_superlink_gets_it(second, second.spec).content == second.fab
