"""The capture loop: MQTT readings and device state into the pod, expired events out.

Readings arrive on paho-mqtt's network thread and wait in a queue; the loop's thread
stores them in batches (one transaction every ``flush_interval``), which is what lets a
pod keep up with a busy broker. paho reconnects by itself after the broker goes away,
and every (re)connection subscribes to the topic patterns again, so a broker restart
loses no subscription. The loop re-reads the sources every ``check_interval``: a source
disabled (or a consent withdrawn, on any of the user's pods) stops capture at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from covey.device.context._context import (
    MqttSettings,
    Reading,
    active,
    device_readings,
    parse_reading,
    purge_expired,
    record,
)

if TYPE_CHECKING:
    from covey.device._pod import Pod

__all__ = ["Capture", "CaptureStats"]

_log = logging.getLogger(__name__)


@dataclass
class CaptureStats:
    """Counts since the loop started (no values)."""

    received: int = 0
    stored: int = 0
    rejected: int = 0
    connects: int = 0
    broker: str = "disconnected"
    reasons: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Mqtt:
    """One paho client for the broker of the pod's MQTT settings."""

    def __init__(self, settings: MqttSettings, inbox: queue.Queue[tuple[str, bytes]],
                 stats: CaptureStats) -> None:
        import paho.mqtt.client as mqtt

        self.settings, self.inbox, self.stats = settings, inbox, stats
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=settings.client_id or "", protocol=mqtt.MQTTv311)
        if settings.username:
            self.client.username_pw_set(settings.username, settings.password or None)
        if settings.tls or settings.ca_file:
            self.client.tls_set(ca_certs=settings.ca_file or None)
        self.client.reconnect_delay_set(min_delay=1, max_delay=5)
        self.client.on_connect = self._connected
        self.client.on_disconnect = self._disconnected
        self.client.on_message = self._message

    def start(self) -> None:
        self.client.connect_async(self.settings.host, self.settings.port, keepalive=30)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _connected(self, client: Any, userdata: Any, flags: Any, reason: Any,
                   properties: Any) -> None:
        if reason.is_failure:
            self.stats.broker = f"refused: {reason}"
            return
        self.stats.connects += 1
        self.stats.broker = "connected"
        client.subscribe([(topic, 1) for topic in self.settings.topics])

    def _disconnected(self, client: Any, userdata: Any, flags: Any, reason: Any,
                      properties: Any) -> None:
        self.stats.broker = "reconnecting"

    def _message(self, client: Any, userdata: Any, message: Any) -> None:
        self.inbox.put((str(message.topic), bytes(message.payload)))


class Capture:
    """Runs the active sources of one pod until :meth:`stop`."""

    def __init__(self, pod: Pod, flush_interval: float = 0.05, device_interval: float = 60.0,
                 check_interval: float = 1.0) -> None:
        self.pod = pod
        self.flush_interval, self.device_interval = flush_interval, device_interval
        self.check_interval = check_interval
        self.stats = CaptureStats()
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._mqtt: _Mqtt | None = None
        self._mqtt_settings: MqttSettings | None = None
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def _check_sources(self) -> None:
        status = active(self.pod, "mqtt")
        settings = MqttSettings.from_dict(status.settings) if status else None
        if settings != self._mqtt_settings:
            if self._mqtt is not None:
                self._mqtt.stop()
                self._mqtt = None
            if settings is not None:
                self._mqtt = _Mqtt(settings, self.inbox, self.stats)
                self._mqtt.start()
            else:
                self.stats.broker = "disconnected"
            self._mqtt_settings = settings

    def flush(self) -> int:
        """Store what has arrived (one transaction); readings stored."""
        readings: list[Reading] = []
        rejected = 0
        while True:
            try:
                topic, payload = self.inbox.get_nowait()
            except queue.Empty:
                break
            self.stats.received += 1
            try:
                readings.append(parse_reading(topic, payload))
            except ValueError as exc:
                rejected += 1
                self.stats.reasons[str(exc)] = self.stats.reasons.get(str(exc), 0) + 1
        if not readings and not rejected:
            return 0
        if self._mqtt_settings is None:  # switched off meanwhile: drop, never store
            return 0
        stored = record(self.pod, "mqtt", readings, rejected)
        self.stats.stored += stored
        self.stats.rejected += rejected
        return stored

    def run(self) -> None:
        """Capture until :meth:`stop` (or ``covey stop``)."""
        from covey.device._stop import is_stopped

        last_check = last_device = last_purge = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now - last_check >= self.check_interval:
                    last_check = now
                    if is_stopped(self.pod.home):
                        break
                    self._check_sources()
                self.flush()
                if now - last_device >= self.device_interval:
                    last_device = now
                    if active(self.pod, "device"):
                        record(self.pod, "device", device_readings())
                if now - last_purge >= min(self.check_interval * 5, 60.0):
                    last_purge = now
                    purge_expired(self.pod)
                self._stop.wait(self.flush_interval)
        finally:
            if self._mqtt is not None:
                self._mqtt.stop()
            self.flush()
