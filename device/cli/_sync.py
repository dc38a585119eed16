"""`covey sync ...`: pair this pod with the user's other devices and keep them in step."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from covey.device._pod import Pod
from covey.device.cli._pod import HomeOpt, JsonOpt, _emit_json, open_pod, out
from covey.errors import InvalidInputError, SyncError

__all__ = ["SyncThread", "sync_app"]

sync_app = typer.Typer(help="Pair this pod with your other devices and keep them in step "
                            "on the local network.", no_args_is_help=True)

AddressOpt = Annotated[str, typer.Option(
    "--address", help="Listen and announce on this address (0.0.0.0: every interface).")]


def _config(address: str, port: int = 0) -> Any:
    from covey.device.sync._sync_loop import LoopConfig

    interface = None if address in ("0.0.0.0", "") else address  # noqa: S104
    return LoopConfig(address=address, port=port, interface=interface)


@sync_app.command("pair")
def sync_pair(
    timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for the other "
                                           "device.")] = 120.0,
    address: AddressOpt = "0.0.0.0",  # noqa: S104
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Pair with another of your devices running `covey sync pair` at the same time.

    Each device shows a 6-digit code; type on each the code the other one shows. Nothing
    is shared unless both codes match (there is no way to skip this).
    """
    from covey.device.sync._sync_loop import SyncLoop
    from covey.protocols import ChannelError

    def say(text: str) -> None:
        if as_json:  # stdout carries only the JSON result
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
        else:
            out.print(text, highlight=False)

    async def confirm(shown: str, peer: dict[str, Any], role: str) -> str:
        what = "give it your user key" if role == "sponsor" else "join its user"
        say(f"Pairing with {peer['name']!r}: this device will {what}.")
        say(f"pairing code: {shown[:3]} {shown[3:]}")
        say("Type the code the other device shows, then Enter:")
        typed = await _read_line(timeout)
        if not typed.strip():
            raise SyncError("pairing needs the code the other device shows, typed here "
                            "(nothing was typed)")
        return typed

    async def run(pod: Pod) -> Any:
        loop = SyncLoop(pod, _config(address))
        await loop.start(run=False)
        try:
            return await loop.pair(confirm, timeout)
        finally:
            await loop.stop()

    from covey.device._stop import check_not_stopped

    with open_pod(home) as pod:
        check_not_stopped(pod.home)
        if not as_json:
            out.print(f"Waiting up to {timeout:g} s for another device running "
                      "`covey sync pair`...")
        try:
            result = asyncio.run(run(pod))
        except TimeoutError:
            raise SyncError(f"no other device in pairing mode answered within {timeout:g} s"
                            ) from None
        except ChannelError as exc:
            raise SyncError(f"pairing failed: {exc}") from None
        from covey.device.sync._sync import PodState

        state = PodState(pod)
        pod.audit("sync.paired", peer=_device_of(result.peer_key),
                  nbytes=result.stats.bytes_out,
                  detail={"role": result.role, "bytes_in": result.stats.bytes_in,
                          "bytes_out": result.stats.bytes_out,
                          "sent_user_key": result.role == "sponsor"})
        key = state.user_key()
        summary = {"sas": result.sas, "role": result.role, "peer": _device_of(result.peer_key),
                   "peer_name": result.peer_info["name"],
                   "user_id": key.user_id if key else "",
                   "devices": [d.to_dict() for d in state.devices()]}
    if as_json:
        _emit_json(summary)
    else:
        out.print(f"Paired with {summary['peer_name']} ({summary['peer']}); this user now has "
                  f"{len(summary['devices'])} devices.")


async def _read_line(timeout: float) -> str:
    """A line from stdin (a daemon thread reads it, so a person who never answers does
    not keep the process alive after the time-out)."""
    loop = asyncio.get_running_loop()
    line: asyncio.Future[str] = loop.create_future()

    def deliver(text: str) -> None:
        if not line.done():
            line.set_result(text)

    def read() -> None:
        text = sys.stdin.readline()
        with contextlib.suppress(RuntimeError):  # the loop already ended (timed out)
            loop.call_soon_threadsafe(deliver, text)

    threading.Thread(target=read, name="covey-pair-code", daemon=True).start()
    try:
        return await asyncio.wait_for(line, timeout)
    except TimeoutError:
        raise SyncError(f"no code was typed within {timeout:g} s") from None


def _device_of(public_key: bytes) -> str:
    from covey.device._pod import DeviceIdentity

    return DeviceIdentity.id_for(public_key)


@sync_app.command("devices")
def sync_devices(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """The user's devices, from their signed certificates, with revocations."""
    from covey.device.sync._sync import PodState

    with open_pod(home) as pod:
        state = PodState(pod)
        rows = [{**d.to_dict(), "this": d.device_id == pod.identity.device_id}
                for d in state.devices()]
    if as_json:
        _emit_json(rows)
        return
    if not rows:
        out.print("Not paired yet: run `covey sync pair` here and on another device.")
        return
    table = Table(title=f"{len(rows)} devices")
    for column in ("device", "name", "since", "status"):
        table.add_column(column)
    for r in rows:
        status = (f"revoked {r['revoked_at'][:10]}" if r["revoked_at"] else
                  "paired" if r["current"] else "not certified by the current user key") + \
            (" (this device)" if r["this"] else "")
        table.add_row(r["device_id"], r["name"], r["issued_at"][:10], status)
    out.print(table)


@sync_app.command("status")
def sync_status(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """The user id, what is shared (counts only) and the latest syncs and refusals."""
    from covey.device.sync._sync import SYNC_MEMORIES, PodState

    with open_pod(home) as pod:
        state = PodState(pod)
        key = state.user_key()
        rows = pod.store.query(
            "SELECT created_at, kind, peer, bytes, detail FROM audit_log WHERE kind LIKE"
            " 'sync%' ORDER BY seq DESC LIMIT 10")
        memories = pod.store.query("SELECT granted FROM consents WHERE scope = ?",
                                   (SYNC_MEMORIES,))
        trust = state.trust()
        report: dict[str, Any] = {
            "user_id": key.user_id if key else None,
            "device_id": pod.identity.device_id,
            # The user key is replaced at every revocation; a pod holding an older one
            # gets the current one at its next sync with another current device.
            "user_key": None if key is None else
            "current" if key.public_key == trust.head else "superseded",
            "key_chain": len(trust.chain),
            "key_conflict": trust.conflict,
            "devices": len(state.devices()),
            "memories_shared": bool(memories and memories[0][0]),
            "collections": state.summary(),
            "recent": [{"at": r["created_at"], "kind": r["kind"], "peer": r["peer"],
                        "bytes": r["bytes"], "detail": r["detail"]} for r in rows],
        }
    if as_json:
        _emit_json(report)
        return
    out.print(f"user: {report['user_id'] or 'none yet (not paired)'}"
              + (f"; user key: {report['user_key']} ({report['key_chain']} in the chain)"
                 if report["user_key"] else ""))
    if report["key_conflict"]:
        out.print("the user key chain forked here (two devices revoked each other): this "
                  "pod trusts no device; erase it (`covey pod forget`) and pair it again")
    out.print(f"this device: {report['device_id']}; devices: {report['devices']}; memories "
              f"{'shared' if report['memories_shared'] else 'not shared'} "
              f"(`covey pod consent {SYNC_MEMORIES} --grant` shares them)")
    for name, counts in sorted(report["collections"].items()):
        out.print(f"  {name}: {counts['live']} live, {counts['tombstones']} deleted")
    for r in report["recent"]:
        out.print(f"  {r['at'][:19]} {r['kind']} {r['peer']} {r['bytes']} B {r['detail']}")


@sync_app.command("revoke")
def sync_revoke(
    device: Annotated[str, typer.Argument(help="A device id (or its first 8+ characters) "
                                          "or name, from `covey sync devices`.")],
    reason: Annotated[str, typer.Option(help="Why, told to the device when it is refused."
                                        )] = "",
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke one of your devices: every pod refuses it from then on and tells it why."""
    from covey.device.sync._sync import PodState

    if len(reason) > 200:
        raise InvalidInputError("a reason is at most 200 characters")
    with open_pod(home) as pod:
        revoked = PodState(pod).revoke(device, reason)
    if as_json:
        _emit_json(revoked.to_dict())
    else:
        out.print(f"Revoked {revoked.device_id} ({revoked.name}) and replaced the user key; "
                  "your other devices learn it, and get the new key, at their next sync. "
                  "Of what it wrote, only what this pod had received counts from now on.")


@sync_app.command("run")
def sync_run(
    address: AddressOpt = "0.0.0.0",  # noqa: S104
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free port).")] = 0,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Sync in the foreground until Ctrl-C (`covey serve` runs the same loop)."""
    from covey.device.sync._sync_loop import SyncLoop

    async def run(pod: Pod) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        sync = SyncLoop(pod, _config(address, port))
        bound = await sync.start()
        if as_json:
            sys.stdout.write(f'{{"port": {bound}}}\n')
        else:
            out.print(f"covey sync: listening on {address}:{bound} (Ctrl-C stops)")
        sys.stdout.flush()
        try:
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(sync.stopped())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await sync.stop()

    from covey.device._stop import running

    with open_pod(home) as pod, running(pod.home, "sync"):
        asyncio.run(run(pod))


class SyncThread:
    """The sync loop on a thread of its own, for `covey serve` (its own store connection)."""

    def __init__(self, home: Path, secret: str, address: str) -> None:
        self.home, self.secret, self.address = home, secret, address
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self.port = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="covey-sync", daemon=True)

    def start(self) -> int:
        self._thread.start()
        self._ready.wait(30)
        if self.error is not None:
            raise self.error
        return self.port

    def _main(self) -> None:
        from covey.device.sync._sync_loop import SyncLoop

        async def run() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            with Pod.open(self.home, self.secret) as pod:
                sync = SyncLoop(pod, _config(self.address))
                try:
                    self.port = await sync.start()
                    self._ready.set()
                    await self._stop.wait()
                finally:
                    await sync.stop()

        try:
            asyncio.run(run())
        except BaseException as exc:
            self.error = exc
        finally:
            self._ready.set()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
