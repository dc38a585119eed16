"""The pod's sync loop: serve sync sessions, announce, find peers, push edits, pair.

One asyncio task does it all. Every ``interval`` it checks whether the pod's store was
written by another connection (SQLite's ``data_version``: the API, a CLI command); when
so, or when a peer sent something new, it syncs with every pod it can see at once;
every ``anti_entropy`` seconds it syncs anyway, which is how a pod that was away
catches up. A peer that refused us, or that we refused, is
left alone for ``REFUSED_BACKOFF`` seconds. Every session that moved entries, and every
refusal (once per peer and reason), is written to the audit log: peer, bytes and
collections, never content.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from covey.device._pod import DeviceIdentity
from covey.device._stop import is_stopped
from covey.device.sync._sync import PodState
from covey.protocols import (
    Announcer,
    Browser,
    ChannelError,
    Pairing,
    PairingBroken,
    PairResult,
    Peer,
    RefusedError,
    SyncServer,
    SyncStats,
    local_addresses,
    pair_with,
    sync_with,
)

if TYPE_CHECKING:
    from covey.device._pod import Pod

__all__ = ["PAIR_RETRY", "REFUSED_BACKOFF", "LoopConfig", "SyncLoop"]

REFUSED_BACKOFF = 30.0
PAIR_RETRY = 1.0  # seconds before asking a pod that was not pairing (or was busy) again
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopConfig:
    """Where the loop listens and announces, and how often it looks for changes."""

    address: str = "127.0.0.1"  # listen and announce here ("0.0.0.0": every interface)
    port: int = 0  # 0: any free port
    interface: str | None = None  # the mDNS interface address (None: all)
    interval: float = 0.1  # seconds between checks for local changes (one pragma each)
    anti_entropy: float = 5.0  # seconds between syncs with every peer regardless


@dataclass
class _PeerState:
    backoff_until: float = 0.0
    reasons: set[str] = field(default_factory=set)


def _device_id(peer_hex: str) -> str:
    try:
        return DeviceIdentity.id_for(bytes.fromhex(peer_hex)) if peer_hex else ""
    except ValueError:
        return ""


class SyncLoop:
    """Runs sync for one unlocked pod until :meth:`stop`."""

    def __init__(self, pod: Pod, config: LoopConfig | None = None) -> None:
        self.pod, self.config = pod, config or LoopConfig()
        self.state = PodState(pod)
        self.server = SyncServer(self.state, pod.identity.private_key, self.state.pin,
                                 on_sync=lambda s: self._record(s, "responder"),
                                 on_refused=self._refused)
        self.announcer: Announcer | None = None
        self.browser: Browser | None = None
        self.port = 0
        self._peers: dict[str, _PeerState] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.sessions = 0  # completed sync sessions, either side

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, run: bool = True) -> int:
        """Listen, announce, browse and (with ``run``) start the loop; the port."""
        self.port = await self.server.start(self.config.address, self.config.port)
        # Listening on every interface: announce every address peers could reach us at.
        announce = local_addresses() if self.config.address in ("0.0.0.0", "") else \
            self.config.address  # noqa: S104
        self.announcer = Announcer(self.port, announce, self.config.interface)
        await self.announcer.start()
        self.browser = Browser(self.config.interface, exclude=self.announcer.instance)
        await self.browser.start()
        if run:
            self._task = asyncio.create_task(self._run())
        return self.port

    async def stopped(self) -> None:
        """Wait until the loop ended by itself (after `covey stop`)."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for part in (self.browser, self.announcer):
            if part is not None:
                await part.stop()
        await self.server.stop()

    # -- the loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        last_round = 0.0
        known: set[str] = set()
        last_vector: dict[str, Any] = {}
        last_trust: tuple[Any, ...] = ()
        while not is_stopped(self.pod.home):  # `covey stop` ends the loop at the next tick
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.interval)
            self._wake.clear()
            try:
                # Local edits, writes by another process, and merges all move the vector.
                self.state.refresh()
                vector = dict(self.state.replica().vector)
            except Exception:
                _log.exception("sync: reading the pod's state failed")
                continue
            changed, last_vector = vector != last_vector, vector
            # Devices and revocations change only with the vector: look only then.
            trust = self._trust() if changed else last_trust
            if trust != last_trust:  # a device was paired or revoked: try everyone again
                last_trust = trust
                for peer_state in self._peers.values():
                    peer_state.backoff_until = 0.0
            peers = self.browser.peers() if self.browser else []
            new = {p.instance for p in peers} - known
            known = {p.instance for p in peers}
            if changed or new or time.monotonic() - last_round > self.config.anti_entropy:
                last_round = time.monotonic()
                await self.sync_all(peers)

    def _trust(self) -> tuple[Any, ...]:
        """Changes whenever the device list or the revocations change."""
        replica = self.state.replica()
        return tuple(sorted((c, k, e.stamp) for (c, k), e in replica.entries.items()
                            if c in ("devices", "revocations")))

    async def sync_all(self, peers: list[Peer] | None = None) -> list[SyncStats]:
        """Sync with every pod in sight (or ``peers``), at once."""
        if peers is None:
            peers = self.browser.peers() if self.browser else []
        now = time.monotonic()
        due = [p for p in peers if self._peers.setdefault(p.instance, _PeerState())
               .backoff_until <= now]
        results = await asyncio.gather(*(self._sync_one(p) for p in due))
        return [r for r in results if r is not None]

    async def _sync_one(self, peer: Peer) -> SyncStats | None:
        stats = SyncStats()
        try:
            await sync_with(peer.address, peer.port, self.state, self.pod.identity.private_key,
                            self.state.pin, stats)
        except RefusedError as exc:
            self._backoff(peer, stats.peer, str(exc))
            return None
        except (ChannelError, OSError, TimeoutError) as exc:
            reason = str(exc) if str(exc).startswith("refused") else ""
            if reason:
                self._backoff(peer, stats.peer, reason)
            else:
                _log.info("sync with %s failed: %s", peer.instance, type(exc).__name__)
            return None
        self._record(stats, "initiator")
        return stats

    def _backoff(self, peer: Peer, peer_hex: str, reason: str) -> None:
        state = self._peers.setdefault(peer.instance, _PeerState())
        state.backoff_until = time.monotonic() + REFUSED_BACKOFF
        self._refused(reason, peer_hex, state)

    def _refused(self, reason: str, peer_hex: str, state: _PeerState | None = None) -> None:
        device = _device_id(peer_hex)
        state = state or self._peers.setdefault("device:" + device, _PeerState())
        if reason in state.reasons:
            return
        state.reasons.add(reason)
        self.pod.audit("sync.refused", peer=device, detail={"reason": reason[:200]})

    def _record(self, stats: SyncStats, role: str) -> None:
        self.sessions += 1
        if stats.changed:
            self._wake.set()  # pass news on to the other peers at once
        if not (stats.sent or stats.received):
            return
        detail: dict[str, Any] = {k: v for k, v in stats.to_dict().items() if k != "peer"}
        # The entry's bytes are what left the pod (egress); the detail has both directions.
        self.pod.audit("sync", peer=_device_id(stats.peer), nbytes=stats.bytes_out,
                       detail={**detail, "role": role})

    # -- pairing -----------------------------------------------------------------------

    async def pair(self, confirm: Callable[[str, dict[str, Any], str], Awaitable[str]],
                   timeout: float) -> PairResult:
        """Wait for another pod in pairing mode and pair with it, once.

        The pod whose announcement has the smaller instance id connects; the other
        waits to be connected to. ``confirm(shown, peer_info, role)`` shows this side's
        code and returns the code the person typed (the other device's).
        Raises TimeoutError, ChannelError (PairingRefused when the codes did not match or
        both devices already belong to a user), SyncError.
        """
        state = self.state
        key = state.user_key()
        if key is not None:
            state.holds_current_key()  # a pod with a superseded key cannot sponsor yet
        info = {"name": self.pod.name, "has_user": key is not None}

        def sponsor(peer_key: bytes, peer_info: dict[str, Any]) -> tuple[str, bytes]:
            state.ensure_user()
            user = state.holds_current_key()
            state.certify(user, peer_key, str(peer_info["name"])[:64])
            return user.user_id, user.private_bytes()

        def join(private: bytes, user_id: str) -> None:
            state.adopt_user_key(private, user_id)

        pairing = Pairing(info, state, confirm, sponsor, join)
        server = self.server
        server.pairing = pairing
        deadline = time.monotonic() + timeout
        retry: dict[str, float] = {}  # instance -> when to try it again
        try:
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    outcome = await asyncio.wait_for(server.paired.get(), 0.5)
                    if isinstance(outcome, BaseException):
                        raise outcome
                    return outcome
                if self.announcer is None or self.browser is None:
                    raise RuntimeError("start the loop before pairing")
                for peer in self.browser.peers():
                    if peer.instance < self.announcer.instance or server.pairing_busy \
                            or retry.get(peer.instance, 0.0) > time.monotonic() \
                            or server.pairing is None:
                        continue
                    server.pairing_busy = True  # nobody pairs with us meanwhile
                    try:
                        return await pair_with(peer.address, peer.port,
                                               self.pod.identity.private_key, pairing)
                    except RefusedError as exc:
                        if exc.code not in ("not_pairing", "busy"):
                            raise
                        # Not pairing (yet), or with another device: ask again shortly.
                        retry[peer.instance] = time.monotonic() + PAIR_RETRY
                    except (OSError, PairingBroken):  # gone, or broke off before the codes
                        retry[peer.instance] = time.monotonic() + PAIR_RETRY
                    finally:
                        server.pairing_busy = False
            raise TimeoutError
        finally:
            server.pairing = None
