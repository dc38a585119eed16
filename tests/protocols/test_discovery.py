"""Pods find each other with real mDNS on the loopback, and the announcement names no one."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from covey.protocols._discovery import SERVICE, Announcer, discover

ANNOUNCE = """
import asyncio, sys
from covey.protocols._discovery import Announcer
async def main():
    a = Announcer(int(sys.argv[1]), interface="127.0.0.1")
    await a.start()
    print(a.instance, flush=True)
    await asyncio.sleep(30)
asyncio.run(main())
"""


def test_a_pod_in_another_process_is_discovered_and_says_nothing_about_its_user() -> None:
    proc = subprocess.Popen([sys.executable, "-c", ANNOUNCE, "45871"], stdout=subprocess.PIPE,
                            text=True)
    try:
        instance = (proc.stdout.readline() if proc.stdout else "").strip()
        assert len(instance) == 16
        deadline = time.monotonic() + 15
        peers = []
        while time.monotonic() < deadline and not peers:
            peers = [p for p in asyncio.run(discover(2.0, interface="127.0.0.1"))
                     if p.instance == instance]
        assert peers, "the announcing pod was not discovered"
        assert (peers[0].address, peers[0].port) == ("127.0.0.1", 45871)
    finally:
        proc.kill()
        proc.wait()


def test_the_announcement_holds_only_a_version_and_a_random_instance_id() -> None:
    first, second = Announcer(1234), Announcer(1234)
    assert first.instance != second.instance  # fresh every run
    info = first._info
    assert set(info.properties) == {b"v", b"id"}
    assert info.name == f"covey-{first.instance}.{SERVICE}"
    assert info.server == f"covey-{first.instance}.local."


@pytest.mark.parametrize("props", [{b"v": b"1", b"id": b"0" * 16},  # protocol 1: ignored
                                   {b"v": b"3", b"id": b"0" * 16},
                                   {b"v": b"2", b"id": b"0" * 16, b"user": b"ana"},
                                   {b"v": b"2"}])
def test_foreign_or_oversharing_announcements_are_ignored(props: dict[bytes, bytes]) -> None:
    from zeroconf.asyncio import AsyncServiceInfo

    from covey.protocols._discovery import _peer

    info = AsyncServiceInfo(SERVICE, f"x.{SERVICE}", port=1, properties=props,
                            addresses=[bytes([127, 0, 0, 1])])
    assert _peer(info) is None


def test_a_well_formed_announcement_is_a_peer() -> None:
    from zeroconf.asyncio import AsyncServiceInfo

    from covey.protocols._discovery import _peer

    info = AsyncServiceInfo(SERVICE, f"x.{SERVICE}", port=4000,
                            properties={b"v": b"2", b"id": b"a" * 16},
                            addresses=[bytes([127, 0, 0, 1])])
    peer = _peer(info)
    assert peer is not None and (peer.instance, peer.address, peer.port) == ("a" * 16,
                                                                             "127.0.0.1", 4000)
