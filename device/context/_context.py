"""Context: what the pod knows about the moment, only from sources the user switched on.

Three sources, each off until enabled on this device, each with a consent record
(scope ``context_<name>``, audited, shared with the user's other pods so that a
withdrawal anywhere stops capture everywhere) and a retention period after which its
events are deleted:

- ``routine``: one ``usage`` event (hour and weekday, nothing else) per user turn; the
  pod learns from them when the user usually talks to it;
- ``device``: battery and network state, sampled where the platform exposes them
  (Linux ``/sys``), and idle time from the user's terminals (what ``w`` shows; a
  desktop's idle time needs its session, so without a terminal it is left out);
- ``mqtt``: readings from a broker (mosquitto or any MQTT 3.1.1/5 broker) on topic
  patterns such as ``home/+/sensor``, with username/password and TLS options. A reading
  is a number, or a JSON object with a numeric ``value`` and an optional ``unit``;
  anything else is rejected and counted.

Events live in ``context_events`` inside the encrypted store and leave the pod only as
the differentially private statistics of :func:`usage_histogram`. The prompt gets the
current context as a few short lines under its own token budget.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covey.device.store import _audit
from covey.errors import InvalidInputError
from covey.privacy import USAGE_SENSITIVITY

if TYPE_CHECKING:
    from covey.device._pod import Pod

__all__ = ["DEFAULT_RETENTION", "SOURCES", "MqttSettings", "Reading", "SourceStatus",
           "UsageRelease", "current_context", "disable", "enable", "parse_reading",
           "parse_retention", "purge_expired", "record", "record_usage", "sources",
           "usage_histogram"]

SOURCES = ("routine", "device", "mqtt")
DEFAULT_RETENTION = {"routine": 30 * 86400, "device": 86400, "mqtt": 86400}
MAX_PAYLOAD = 1024  # bytes of one MQTT reading
MAX_TOPIC = 200
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(when: datetime) -> str:
    return when.isoformat(timespec="microseconds")


def parse_retention(text: str) -> int:
    """``90s``, ``15m``, ``12h``, ``7d`` or plain seconds, as seconds (raises
    InvalidInputError)."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if not match or int(match.group(1)) == 0:
        raise InvalidInputError(f"retention {text!r}: use a positive number with s, m, h or d")
    return int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


@dataclass(frozen=True)
class MqttSettings:
    """How to reach the broker and what to subscribe to."""

    host: str = "127.0.0.1"
    port: int = 1883
    topics: tuple[str, ...] = ("home/+/sensor",)
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: str = ""  # a CA certificate for TLS (else the system's)
    client_id: str = ""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise InvalidInputError(f"MQTT port {self.port} is not a port")
        if not self.topics:
            raise InvalidInputError("MQTT needs at least one topic pattern")
        for topic in self.topics:
            if not topic or len(topic) > MAX_TOPIC or "#" in topic[:-1] or "\0" in topic:
                raise InvalidInputError(f"not an MQTT topic pattern: {topic!r}")
        if self.ca_file and not Path(self.ca_file).is_file():
            raise InvalidInputError(f"no CA certificate at {self.ca_file}")

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "topics": list(self.topics),
                "username": self.username, "password": self.password, "tls": self.tls,
                "ca_file": self.ca_file, "client_id": self.client_id}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MqttSettings:
        return cls(str(d.get("host", "127.0.0.1")), int(d.get("port", 1883)),
                   tuple(d.get("topics", ("home/+/sensor",))), str(d.get("username", "")),
                   str(d.get("password", "")), bool(d.get("tls", False)),
                   str(d.get("ca_file", "")), str(d.get("client_id", "")))


@dataclass(frozen=True)
class SourceStatus:
    """What `covey context status` shows for one source (no event values)."""

    name: str
    enabled: bool
    consented: bool
    retention_s: int
    events: int
    captured: int
    rejected: int
    last_event_at: str | None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Capturing: enabled here and consented."""
        return self.enabled and self.consented

    def to_dict(self) -> dict[str, Any]:
        shown = {k: v for k, v in self.settings.items() if k != "password"}
        if self.settings.get("password"):
            shown["password"] = "(set)"  # noqa: S105 - a marker, not a secret
        return {"name": self.name, "enabled": self.enabled, "consented": self.consented,
                "active": self.active, "retention_s": self.retention_s, "events": self.events,
                "captured": self.captured, "rejected": self.rejected,
                "last_event_at": self.last_event_at, "settings": shown}


def _scope(name: str) -> str:
    return f"context_{name}"


def _check(name: str) -> None:
    if name not in SOURCES:
        raise InvalidInputError(f"unknown context source {name!r}; one of {', '.join(SOURCES)}")


def enable(pod: Pod, name: str, retention_s: int | None = None,
           settings: dict[str, Any] | None = None) -> SourceStatus:
    """Switch a source on (consent recorded and audited)."""
    from covey.device.assistant._feedback import set_consent

    _check(name)
    retention = retention_s or DEFAULT_RETENTION[name]
    with pod.store.transaction() as c:
        c.execute("INSERT INTO context_sources (name, enabled, retention_s, settings, updated_at)"
                  " VALUES (?, 1, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET enabled = 1,"
                  " retention_s = excluded.retention_s, settings = excluded.settings,"
                  " updated_at = excluded.updated_at",
                  (name, retention, json.dumps(settings or {}), _iso(_now())))
        _audit.append(c, "context.enabled", detail={"source": name, "retention_s": retention})
    set_consent(pod, _scope(name), True)
    return next(s for s in sources(pod) if s.name == name)


def disable(pod: Pod, name: str) -> int:
    """Switch a source off, withdraw its consent and erase its events; rows erased."""
    from covey.device.assistant._feedback import set_consent

    _check(name)
    with pod.store.transaction() as c:
        c.execute("UPDATE context_sources SET enabled = 0, updated_at = ? WHERE name = ?",
                  (_iso(_now()), name))
        erased = c.execute("DELETE FROM context_events WHERE source = ?", (name,)).rowcount
        _audit.append(c, "context.disabled", detail={"source": name, "erased": erased})
    set_consent(pod, _scope(name), False)
    pod.store.checkpoint()
    return erased


def sources(pod: Pod, counts: bool = True) -> list[SourceStatus]:
    """Every source, enabled or not. ``counts=False`` leaves out the events held (a scan
    of the events table), for callers that only ask whether a source is on."""
    rows = {r["name"]: r for r in pod.store.query("SELECT * FROM context_sources")}
    consents = {r[0]: bool(r[1]) for r in pod.store.query(
        "SELECT scope, granted FROM consents WHERE scope LIKE 'context_%'")}
    held = {r[0]: (int(r[1]), r[2]) for r in pod.store.query(
        "SELECT source, count(*), max(created_at) FROM context_events GROUP BY source")
    } if counts else {}
    found = []
    for name in SOURCES:
        row = rows.get(name)
        events, last = held.get(name, (0, None))
        found.append(SourceStatus(
            name, bool(row and row["enabled"]), consents.get(_scope(name), False),
            int(row["retention_s"]) if row else DEFAULT_RETENTION[name], events,
            int(row["captured"]) if row else 0, int(row["rejected"]) if row else 0, last,
            json.loads(row["settings"]) if row else {}))
    return found


def active(pod: Pod, name: str) -> SourceStatus | None:
    """The source's status if it is capturing now (enabled and consented), else None."""
    status = next(s for s in sources(pod, counts=False) if s.name == name)
    return status if status.active else None


@dataclass(frozen=True)
class Reading:
    """One validated context value."""

    kind: str
    value: dict[str, Any]


def record(pod: Pod, source: str, readings: list[Reading], rejected: int = 0) -> int:
    """Store readings of an active source (one transaction); how many were stored.

    Nothing is stored for a source that is not enabled and consented right now.
    """
    status = active(pod, source)
    if status is None:
        return 0
    now = _now()
    expires = _iso(now + timedelta(seconds=status.retention_s))
    with pod.store.transaction() as c:
        c.executemany("INSERT INTO context_events (source, kind, value, created_at, expires_at)"
                      " VALUES (?, ?, ?, ?, ?)",
                      [(source, r.kind, json.dumps(r.value), _iso(now), expires)
                       for r in readings])
        c.execute("UPDATE context_sources SET captured = captured + ?, rejected = rejected + ?"
                  " WHERE name = ?", (len(readings), rejected, source))
    return len(readings)


def local_now(pod: Pod) -> datetime:
    """Now, in the user's time zone (their profile's, else this device's)."""
    from zoneinfo import ZoneInfo

    from covey.device.memory._profile import get_profile

    zone = get_profile(pod).get("timezone")
    return datetime.now(ZoneInfo(zone)) if zone else datetime.now().astimezone()


def record_usage(pod: Pod, when: datetime | None = None) -> bool:
    """A user turn, for the routine source (if it is on): hour and weekday only."""
    when = when or local_now(pod)
    return bool(record(pod, "routine", [Reading("usage", {"hour": when.hour,
                                                          "weekday": when.weekday()})]))


def purge_expired(pod: Pod) -> int:
    """Delete every expired event (audited when any were); rows deleted."""
    with pod.store.transaction() as c:
        erased = c.execute("DELETE FROM context_events WHERE expires_at <= ?",
                           (_iso(_now()),)).rowcount
        if erased:
            _audit.append(c, "erasure", detail={"table": "context_events", "rows": erased,
                                                "by": "retention"})
    if erased:
        pod.store.checkpoint()
    return erased


# -- readings --------------------------------------------------------------------------


def parse_reading(topic: str, payload: bytes) -> Reading:
    """A sensor reading from an MQTT message (raises ValueError with the reason)."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload too large")
    if len(topic) > MAX_TOPIC:
        raise ValueError("topic too long")
    try:
        text = payload.decode("utf-8").strip()
        data: Any = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise ValueError("not a number or a JSON object") from None
    unit = ""
    if isinstance(data, dict):
        unit = data.get("unit", "")
        if not isinstance(unit, str) or len(unit) > 16:
            raise ValueError("bad unit")
        data = data.get("value")
    if isinstance(data, bool) or not isinstance(data, int | float):
        raise ValueError("no numeric value")
    value = float(data)
    if not math.isfinite(value) or abs(value) > 1e9:
        raise ValueError("value out of range")
    return Reading("sensor", {"topic": topic, "value": value, "unit": unit})


def device_readings(root: Path = Path("/sys/class")) -> list[Reading]:
    """Battery and network state where the platform exposes them (Linux sysfs)."""
    readings: list[Reading] = []
    for supply in sorted((root / "power_supply").glob("*")):
        try:
            if (supply / "type").read_text().strip() != "Battery":
                continue
            capacity = int((supply / "capacity").read_text().strip())
            status = (supply / "status").read_text().strip().lower()
        except (OSError, ValueError):
            continue
        readings.append(Reading("battery", {"percent": capacity, "status": status}))
        break
    up = []
    for link in sorted((root / "net").glob("*")):
        if link.name == "lo":
            continue
        try:
            if (link / "operstate").read_text().strip() == "up":
                up.append("wifi" if (link / "wireless").exists() else "wired")
        except OSError:
            continue
    readings.append(Reading("network", {"online": bool(up), "links": sorted(set(up))}))
    idle = _idle_seconds()
    if idle is not None:
        readings.append(Reading("idle", {"seconds": idle}))
    return readings


def _idle_seconds(devices: Path = Path("/dev")) -> int | None:
    """Seconds since the user last typed in one of their terminals (what `w` shows), or
    None where no terminal of theirs exists (a desktop's idle time needs its session)."""
    import time

    uid = os.getuid()
    ages = []
    for tty in [*devices.glob("pts/[0-9]*"), *devices.glob("tty[0-9]*")]:
        try:
            st = tty.stat()
        except OSError:
            continue
        if st.st_uid == uid:
            ages.append(max(0.0, time.time() - st.st_atime))
    return int(min(ages)) if ages else None


# -- the prompt ------------------------------------------------------------------------


def _ago(created: str, now: datetime) -> str:
    seconds = max(0, int((now - datetime.fromisoformat(created)).total_seconds()))
    if seconds < 90:
        return "just now"
    if seconds < 5400:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


def _part_of_day(hour: int) -> str:
    return ("night" if hour < 6 else "morning" if hour < 12 else "afternoon" if hour < 18
            else "evening")


def current_context(pod: Pod, when: datetime | None = None, limit: int = 6) -> list[str]:
    """Short lines about now from the active sources, most relevant first."""
    local = when or local_now(pod)
    now = local.astimezone(UTC)
    lines: list[str] = []
    live = {s.name for s in sources(pod, counts=False) if s.active}
    if not live:
        return lines
    fresh = _iso(now)
    if "routine" in live:
        rows = pod.store.query("SELECT value FROM context_events WHERE source = 'routine'"
                               " AND kind = 'usage' AND expires_at > ?", (fresh,))
        usage = [json.loads(r[0]) for r in rows]
        hours = [u["hour"] for u in usage]
        line = f"It is {_WEEKDAYS[local.weekday()]} {_part_of_day(local.hour)}"
        near = sum(1 for h in hours if min(abs(h - local.hour), 24 - abs(h - local.hour)) <= 1)
        if len(hours) >= 10:
            # "Often": at least twice what an even spread over the hours (or days) gives.
            usual = near / len(hours) >= 2 * 3 / 24
            line += (" (the user often talks to you at this time" if usual
                     else " (the user rarely talks to you at this time")
            days = sum(1 for u in usage if u.get("weekday") == local.weekday())
            if days / len(usage) >= 2 / 7:
                line += f", and often on {_WEEKDAYS[local.weekday()]}s"
            line += ")"
        lines.append(line + ".")
    if "mqtt" in live:
        rows = pod.store.query(
            "SELECT value, max(created_at) FROM context_events WHERE source = 'mqtt'"
            " AND expires_at > ? GROUP BY json_extract(value, '$.topic')"
            " ORDER BY max(created_at) DESC LIMIT ?", (fresh, limit))
        for value, created in rows:
            v = json.loads(value)
            name = "/".join(p for p in v["topic"].split("/")[1:-1]) or v["topic"]
            unit = f" {v['unit']}" if v["unit"] else ""
            lines.append(f"{name.replace('_', ' ')}: {v['value']:g}{unit} ({_ago(created, now)})")
    if "device" in live:
        rows = pod.store.query(
            "SELECT kind, value FROM context_events WHERE source = 'device' AND expires_at > ?"
            " ORDER BY id DESC LIMIT 6", (fresh,))
        latest: dict[str, dict[str, Any]] = {}
        for kind, value in rows:
            latest.setdefault(kind, json.loads(value))
        if "battery" in latest:
            b = latest["battery"]
            lines.append(f"battery {b['percent']}% ({b['status']})")
        if "network" in latest:
            lines.append("online" if latest["network"]["online"] else "offline")
        if "idle" in latest and latest["idle"]["seconds"] >= 300:
            lines.append(f"the user has been away for {latest['idle']['seconds'] // 60} min")
    return lines[:limit]


# -- shared statistics, only under DP --------------------------------------------------


@dataclass(frozen=True)
class UsageRelease:
    """A differentially private hour-of-day usage histogram, as it leaves the pod."""

    hours: list[float]  # 24 noisy fractions (they may be negative: that is the noise)
    epsilon: float  # the user's total epsilon after this release (stays on the pod)
    delta: float
    noise_multiplier: float
    sensitivity: float = USAGE_SENSITIVITY
    release_epsilon: float = 0.0  # this release alone: what the aggregator may be told


def usage_histogram(pod: Pod, noise_multiplier: float, run_id: str,
                    peer: str = "") -> UsageRelease:
    """Release when the user uses the pod, under user-level local DP, and charge it.

    Mechanism: the Gaussian mechanism on the pod's hour-of-day histogram of ``usage``
    events, normalized to fractions (so it sums to 1 whatever the amount of use). Any two
    users' histograms differ by at most sqrt(2) in L2 norm (the user-level sensitivity,
    replacing one user's whole data by another's), and each of the 24 bins gets
    N(0, (z sqrt 2)^2). One release is one Gaussian mechanism with noise multiplier z
    and no sampling: it is recorded in the ledger (mode ``local``) and composed with
    every federated round by the same accountant, against the same budget.
    Assumption: a user's routine events are theirs alone (one user per pod).

    Raises:
        RoundRefused: the pod is stopped (`covey stop`), the routine source is off, or
            the release would exceed the user's maximum epsilon (nothing is recorded or
            released then).
    """
    import numpy as np

    from covey.device._stop import is_stopped
    from covey.device.federation._budget import pod_ledger
    from covey.device.federation._participation import RoundRefused, refusal
    from covey.privacy import (
        BudgetExceeded,
        LedgerTampered,
        Release,
        RunChanged,
        epsilon_spent,
        gaussian_release,
    )

    if is_stopped(pod.home):  # `covey stop` halts every release, as it halts rounds
        raise RoundRefused("stopped", "refused: the pod was stopped with `covey stop`")
    if not noise_multiplier > 0:
        raise RoundRefused("not_private", "refused: a usage release needs noise")
    if active(pod, "routine") is None:
        raise RoundRefused("no_consent", "refused: the routine context source is off")
    rows = pod.store.query("SELECT value FROM context_events WHERE source = 'routine'"
                           " AND kind = 'usage' AND expires_at > ?", (_iso(_now()),))
    counts = np.zeros(24)
    for (value,) in rows:
        counts[int(json.loads(value)["hour"]) % 24] += 1
    fractions = counts / counts.sum() if counts.sum() else counts
    ledger = pod_ledger(pod)
    # The clip norm is the sensitivity itself (sqrt 2), so the release's sensitivity
    # in units of it is 1 and the accountant composes z.
    release = Release(kind="usage_histogram", run_id=run_id, round=1, mode="local",
                      noise_multiplier=noise_multiplier, clip_norm=USAGE_SENSITIVITY,
                      sensitivity=1.0, sample_rate=1.0, planned_rounds=1, rounds=1,
                      run_delta=ledger.policy.delta, peer=peer, nbytes=24 * 8)
    hours = [float(v) for v in gaussian_release(fractions, USAGE_SENSITIVITY,
                                                 noise_multiplier)]

    def audit(c: Any, entry: Any) -> None:
        _audit.append(c, "context_stats", peer=peer, nbytes=24 * 8, epsilon=entry.epsilon,
                      detail={"run_id": run_id, "kind": "usage_hours",
                              "noise_multiplier": noise_multiplier})

    try:
        entry = ledger.spend(release, audit)
    except (BudgetExceeded, RunChanged, LedgerTampered) as exc:
        raise refusal(exc) from None
    alone = epsilon_spent([release.segment()], ledger.policy.delta,  # type: ignore[list-item]
                          ledger.policy.accountant)
    return UsageRelease(hours, entry.epsilon, ledger.policy.delta, noise_multiplier,
                        release_epsilon=alone)
