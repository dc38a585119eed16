"""`covey context ...` and `covey stop`: what the pod may know about the moment, and the
fail-safe that halts everything."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from covey.device._pod import Pod
from covey.device.cli._pod import HomeOpt, JsonOpt, _emit_json, home_for, open_pod, out
from covey.device.context._context import SOURCES, MqttSettings, parse_retention
from covey.errors import InvalidInputError, PodNotFoundError

__all__ = ["CaptureThread", "context_app", "stop_command"]

context_app = typer.Typer(help="Context the pod may use: time and routine, device state, "
                               "MQTT sensors. Every source is off until you enable it.",
                          no_args_is_help=True)

SourceArg = Annotated[str, typer.Argument(help=f"One of {', '.join(SOURCES)}.")]


@context_app.command("enable")
def context_enable(
    source: SourceArg,
    retention: Annotated[str | None, typer.Option(
        help="Keep events this long, e.g. 90s, 12h, 7d (default: 30d routine, 1d others)."
    )] = None,
    broker: Annotated[str, typer.Option(help="mqtt: the broker, HOST:PORT.")
                      ] = "127.0.0.1:1883",
    topic: Annotated[list[str] | None, typer.Option(
        help="mqtt: a topic pattern to subscribe to (repeatable; default home/+/sensor).")
    ] = None,
    username: Annotated[str, typer.Option(help="mqtt: the broker user name.")] = "",
    password_env: Annotated[str, typer.Option(
        help="mqtt: the environment variable holding the broker password.")] = "",
    tls: Annotated[bool, typer.Option("--tls", help="mqtt: connect with TLS.")] = False,
    ca_file: Annotated[Path | None, typer.Option(help="mqtt: CA certificate for TLS.")
                       ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Switch a context source on (a consent record is kept and audited)."""
    from covey.device.context._context import enable

    settings = {}
    if source == "mqtt":
        host, _, port = broker.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidInputError(f"--broker {broker!r}: use HOST:PORT")
        password = ""
        if password_env:
            password = os.environ.get(password_env, "")
            if not password:
                raise InvalidInputError(f"the environment variable {password_env} is empty")
        settings = MqttSettings(host, int(port), tuple(topic or ("home/+/sensor",)), username,
                                password, tls, str(ca_file or "")).to_dict()
    seconds = parse_retention(retention) if retention else None
    with open_pod(home) as pod:
        status = enable(pod, source, seconds, settings)
    if as_json:
        _emit_json(status.to_dict())
    else:
        out.print(f"Enabled {source} (events kept {status.retention_s} s). `covey context run` "
                  "or `covey serve` captures it.")


@context_app.command("disable")
def context_disable(source: SourceArg, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Switch a source off, withdraw its consent and erase what it captured."""
    from covey.device.context._context import disable

    with open_pod(home) as pod:
        erased = disable(pod, source)
    if as_json:
        _emit_json({"source": source, "enabled": False, "erased": erased})
    else:
        out.print(f"Disabled {source}; erased {erased} events.")


@context_app.command("status")
def context_status(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Each source: on or off, consent, retention, events held, captured and rejected."""
    from covey.device.context._context import purge_expired, sources

    with open_pod(home) as pod:
        purge_expired(pod)
        rows = [s.to_dict() for s in sources(pod)]
    if as_json:
        _emit_json(rows)
        return
    table = Table(title="context sources")
    for column in ("source", "on", "retention", "events", "captured", "rejected", "last"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["name"], "yes" if r["active"] else "no", f"{r['retention_s']} s",
                      str(r["events"]), str(r["captured"]), str(r["rejected"]),
                      (r["last_event_at"] or "-")[:19])
    out.print(table)


@context_app.command("list")
def context_list(
    source: Annotated[str | None, typer.Option(help="Only this source.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many.")] = 20,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The latest context events (yours to see; they never leave the pod), and what the
    next prompt would include."""
    from covey.device.context._context import current_context, purge_expired

    with open_pod(home) as pod:
        purge_expired(pod)
        where, params = ("WHERE source = ?", (source, limit)) if source else ("", (limit,))
        rows = [{"source": r[0], "kind": r[1], "value": json.loads(r[2]), "at": r[3],
                 "expires_at": r[4]} for r in pod.store.query(
            "SELECT source, kind, value, created_at, expires_at FROM context_events "  # noqa: S608
            f"{where} ORDER BY id DESC LIMIT ?", params)]
        prompt = current_context(pod)
    if as_json:
        _emit_json({"events": rows, "prompt": prompt})
        return
    for r in rows:
        out.print(f"{r['at'][:19]} {r['source']:7} {r['kind']:8} {json.dumps(r['value'])}")
    out.print("In the next prompt: " + ("; ".join(prompt) if prompt else "(nothing)"))


@context_app.command("run")
def context_run(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Capture the enabled sources in the foreground until Ctrl-C (`covey serve` does it
    too)."""
    from covey.device._stop import running
    from covey.device.context._capture import Capture

    with open_pod(home) as pod, running(pod.home, "context"):
        capture = Capture(pod)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: capture.stop())
        if as_json:
            sys.stdout.write('{"capturing": true}\n')
        else:
            out.print("covey context: capturing (Ctrl-C stops)")
        sys.stdout.flush()
        capture.run()
        stats = capture.stats.to_dict()
    if as_json:
        _emit_json(stats)


class CaptureThread:
    """The capture loop on a thread of its own, for `covey serve`."""

    def __init__(self, home: Path, secret: str) -> None:
        self.home, self.secret = home, secret
        self.capture: object | None = None
        self._thread = threading.Thread(target=self._main, name="covey-capture", daemon=True)
        self._ready = threading.Event()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(30)

    def _main(self) -> None:
        from covey.device.context._capture import Capture

        try:
            with Pod.open(self.home, self.secret) as pod:
                capture = Capture(pod)
                self.capture = capture
                self._ready.set()
                capture.run()
        except Exception:
            logging.getLogger(__name__).exception("context capture stopped")
        finally:
            self._ready.set()

    def stop(self) -> None:
        capture = self.capture
        if capture is not None:
            capture.stop()  # type: ignore[attr-defined]
        self._thread.join(10)


def stop_command(
    release: Annotated[bool, typer.Option(
        "--release", help="Let the pod run again (needs the passphrase).")] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Halt generation, sync, capture and training on this pod at once.

    No passphrase is needed. Everything stays halted until `covey stop --release`.
    """
    from covey.device import _stop

    resolved = home_for(home)
    if not Pod.exists(resolved):
        raise PodNotFoundError(resolved)
    if release:
        with open_pod(home) as pod:
            since = _stop.release(resolved)
            if since:
                pod.audit("pod.released", detail={"stopped_at": since})
        report: dict[str, object] = {"released": since is not None, "stopped_at": since}
        message = "Released: the pod may run again." if since else "The pod was not stopped."
    else:
        report = _stop.stop(resolved)
        names = ", ".join(str(p) for p in report["processes"]) or "nothing was running"  # type: ignore[attr-defined]
        message = f"Stopped ({names}). `covey stop --release` lets the pod run again."
    if as_json:
        _emit_json(report)
    else:
        out.print(message)
