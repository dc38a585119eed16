"""Pairing as a device on the same network would attack it: real pods, real zeroconf on
the loopback, real Noise channels. The person at the two devices types on each the code
the other one shows; the attackers know every code the person can see."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from covey.device import Pod
from covey.device.sync._sync import PodState
from covey.device.sync._sync_loop import LoopConfig, SyncLoop
from covey.protocols._session import Pairing, PairingRefused, PairResult, pair_with
from tests.conftest import FAST_CONFIG, PASSPHRASE

LOOPBACK = LoopConfig(address="127.0.0.1", interface="127.0.0.1")


class Person:
    """Sees the two screens of the devices being paired, and nothing else."""

    def __init__(self, devices: tuple[str, str]) -> None:
        self.devices = devices
        self.screens: dict[str, str] = {}

    def at(self, device: str) -> Any:
        other = next(d for d in self.devices if d != device)

        async def confirm(shown: str, peer: dict[str, Any], role: str) -> str:
            self.screens[device] = shown
            for _ in range(60):  # reads the other screen; types nothing if it shows none
                if other in self.screens:
                    return self.screens[other]
                await asyncio.sleep(0.05)
            return ""
        return confirm


def _pod(root: Path, name: str) -> Pod:
    return Pod.create(root / name, PASSPHRASE, name=name, config=FAST_CONFIG)


async def _attacker(pod: Pod, target: SyncLoop, person: Person, victim: str) -> Any:
    """A pod that pairs straight to ``target`` and says yes to whatever it sees (it even
    types the code the victim shows)."""
    state = PodState(pod)
    key = state.user_key()

    async def confirm(shown: str, peer: dict[str, Any], role: str) -> str:
        for _ in range(60):
            if victim in person.screens:
                return person.screens[victim]
            await asyncio.sleep(0.05)
        return ""

    def sponsor(peer_key: bytes, info: dict[str, Any]) -> tuple[str, bytes]:
        user = state.ensure_user()
        state.certify(user, peer_key, "victim")
        return user.user_id, user.private_bytes()

    pairing = Pairing({"name": "kitchen", "has_user": key is not None}, state, confirm, sponsor,
                      lambda private, user: state.adopt_user_key(private, user))
    try:
        return await pair_with("127.0.0.1", target.port, pod.identity.private_key, pairing)
    except Exception as exc:  # the outcome is what the test checks
        return exc


@pytest.mark.slow
def test_a_device_racing_in_gets_no_user_key_and_gives_none(tmp_path: Path) -> None:
    """While the person pairs the phone (which has a user) with a new laptop, one device
    on the network connects to the phone first to receive the user key, and another,
    with a user of its own, connects to the laptop to become its sponsor."""
    phone, laptop = _pod(tmp_path, "phone"), _pod(tmp_path, "laptop")
    thief, impostor = _pod(tmp_path, "thief"), _pod(tmp_path, "impostor")
    PodState(impostor).ensure_user()
    PodState(phone).ensure_user()
    phone_user = PodState(phone).user_key()
    assert phone_user is not None

    async def run() -> tuple[list[Any], PairResult, PairResult]:
        loops = [SyncLoop(phone, LOOPBACK), SyncLoop(laptop, LOOPBACK)]
        for loop in loops:
            await loop.start(run=False)
        person = Person(("phone", "laptop"))
        try:
            tasks = [asyncio.ensure_future(loop.pair(person.at(name), 20))
                     for loop, name in zip(loops, ("phone", "laptop"), strict=True)]
            await asyncio.sleep(0)  # both are in pairing mode now
            attacks = await asyncio.gather(
                _attacker(thief, loops[0], person, "phone"),
                _attacker(impostor, loops[1], person, "laptop"))
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            # Each device showed the code of its session with an attacker; the person typed
            # on each what the other showed, which matches neither session.
            assert all(isinstance(o, PairingRefused) and "the code typed here" in str(o)
                       for o in outcomes), outcomes
            assert set(person.screens) == {"phone", "laptop"}
            # The person tries again: the phone and the laptop pair with each other.
            person = Person(("phone", "laptop"))
            again = await asyncio.gather(*(loop.pair(person.at(name), 20) for loop, name in
                                           zip(loops, ("phone", "laptop"), strict=True)))
            return attacks, again[0], again[1]
        finally:
            for loop in loops:
                await loop.stop()

    try:
        attacks, on_phone, on_laptop = asyncio.run(run())
        assert all(isinstance(a, PairingRefused) for a in attacks), attacks
        assert PodState(thief).user_key() is None  # received nothing
        impostor_state = PodState(impostor)
        assert {d.name for d in impostor_state.devices()} == {"impostor"}  # certified nobody
        # The phone certified only the laptop, with the key it had; the laptop joined it.
        assert {d.name for d in PodState(phone).devices()} == {"phone", "laptop"}
        key = PodState(phone).user_key()
        assert key is not None and key.public_key == phone_user.public_key
        laptop_key = PodState(laptop).user_key()
        assert laptop_key is not None and laptop_key.user_id == phone_user.user_id
        assert (on_phone.role, on_laptop.role) == ("sponsor", "joined")
    finally:
        for pod in (phone, laptop, thief, impostor):
            with contextlib.suppress(Exception):
                pod.close()


@pytest.mark.slow
def test_the_second_device_may_start_pairing_a_little_later(tmp_path: Path) -> None:
    """The device that connects (the smaller announcement id) starts first and finds the
    other not pairing yet; it asks again, and the pairing happens once the person has
    started it on the second device too."""
    first, second = _pod(tmp_path, "first"), _pod(tmp_path, "second")

    async def run() -> list[PairResult]:
        loops = [SyncLoop(first, LOOPBACK), SyncLoop(second, LOOPBACK)]
        for loop in loops:
            await loop.start(run=False)
        assert loops[0].announcer is not None and loops[1].announcer is not None
        early, late = sorted(loops, key=lambda lp: lp.announcer.instance)  # type: ignore[union-attr]
        person = Person(("early", "late"))
        try:
            started = asyncio.ensure_future(early.pair(person.at("early"), 20))
            await asyncio.sleep(3.0)  # it has seen the other, which refused: not pairing yet
            return list(await asyncio.gather(started, late.pair(person.at("late"), 20)))
        finally:
            for loop in loops:
                await loop.stop()

    try:
        results = asyncio.run(run())
        assert sorted(r.role for r in results) == ["joined", "sponsor"]
    finally:
        first.close()
        second.close()


@pytest.mark.slow
def test_a_device_that_breaks_off_before_the_codes_does_not_end_the_pairing(
        tmp_path: Path) -> None:
    """A stray device connects in pairing mode and sends nonsense: the phone drops it,
    shows no code for it, and pairs with the laptop the person is holding."""
    phone, laptop, stray = (_pod(tmp_path, n) for n in ("phone", "laptop", "stray"))

    async def run() -> tuple[Any, list[PairResult]]:
        loops = [SyncLoop(phone, LOOPBACK), SyncLoop(laptop, LOOPBACK)]
        for loop in loops:
            await loop.start(run=False)
        person = Person(("phone", "laptop"))
        try:
            on_phone = asyncio.ensure_future(loops[0].pair(person.at("phone"), 20))
            await asyncio.sleep(0)

            async def never(*_: Any) -> str:
                raise AssertionError("no code is shown to a stray device's person")

            nonsense = Pairing({"name": 7, "has_user": False}, PodState(stray), never,
                               lambda *_: ("", b""), lambda *_: None)
            broke_off: Any = None
            try:
                await pair_with("127.0.0.1", loops[0].port, stray.identity.private_key,
                                nonsense)
            except Exception as exc:  # the outcome is what the test checks
                broke_off = exc
            results = await asyncio.gather(on_phone, loops[1].pair(person.at("laptop"), 20))
            return broke_off, list(results)
        finally:
            for loop in loops:
                await loop.stop()

    try:
        broke_off, results = asyncio.run(run())
        assert isinstance(broke_off, Exception) and not isinstance(broke_off, PairingRefused)
        assert sorted(r.role for r in results) == ["joined", "sponsor"]
        assert PodState(stray).user_key() is None
    finally:
        for pod in (phone, laptop, stray):
            pod.close()
