"""The sync channel: mutual authentication with pinned keys; framed, encrypted messages
that cannot be altered, replayed or reordered; malformed input never crashes it."""

from __future__ import annotations

import contextlib
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from covey.protocols._channel import (
    MAX_FRAME,
    ChannelError,
    FrameReader,
    Handshake,
    Pinning,
    SecureChannel,
)


def _pub(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def _pins(*allowed: bytes, revoked: bytes = b"") -> Pinning:
    def check(device: bytes) -> str | None:
        if device == revoked:
            return "this device was revoked by its user"
        return None if device in allowed else "not a paired device"
    return check


def _connect(a_key: Ed25519PrivateKey, b_key: Ed25519PrivateKey, a_pins: Pinning,
             b_pins: Pinning) -> tuple[SecureChannel, SecureChannel]:
    a = Handshake(a_key, a_pins, initiator=True)
    b = Handshake(b_key, b_pins, initiator=False)
    [hello] = FrameReader().feed(a.hello())
    [reply] = FrameReader().feed(b.reply(hello))
    last, a_channel = a.finish(reply)
    [proof] = FrameReader().feed(last)
    return a_channel, b.accept(proof)


def test_paired_pods_talk_both_ways() -> None:
    phone, laptop = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    a, b = _connect(phone, laptop, _pins(_pub(laptop)), _pins(_pub(phone)))
    assert a.peer_key == _pub(laptop) and b.peer_key == _pub(phone)
    reader = FrameReader()
    for i in range(3):
        [frame] = reader.feed(a.seal({"type": "delta", "n": i}))
        assert b.open(frame) == {"type": "delta", "n": i}
    [back] = FrameReader().feed(b.seal({"type": "ack"}))
    assert a.open(back) == {"type": "ack"}


def test_altered_replayed_and_reordered_frames_are_refused() -> None:
    phone, laptop = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    a, b = _connect(phone, laptop, _pins(_pub(laptop)), _pins(_pub(phone)))
    frames = [FrameReader().feed(a.seal({"n": i}))[0] for i in range(3)]
    altered = bytearray(frames[0])
    altered[5] ^= 1
    with pytest.raises(ChannelError, match="authentication"):
        b.open(bytes(altered))
    assert b.open(frames[0]) == {"n": 0}
    with pytest.raises(ChannelError):
        b.open(frames[0])  # replayed
    with pytest.raises(ChannelError):
        b.open(frames[2])  # frame 1 skipped


def test_an_unpaired_or_revoked_device_is_refused_with_the_reason() -> None:
    phone, laptop, stranger = (Ed25519PrivateKey.generate() for _ in range(3))
    with pytest.raises(ChannelError, match="not a paired device"):
        _connect(stranger, laptop, _pins(_pub(laptop)), _pins(_pub(phone)))
    with pytest.raises(ChannelError, match="revoked"):
        _connect(phone, laptop, _pins(_pub(laptop)), _pins(revoked=_pub(phone)))
    with pytest.raises(ChannelError, match="not a paired device"):  # the initiator checks too
        _connect(phone, stranger, _pins(_pub(laptop)), _pins(_pub(phone)))


def test_a_man_in_the_middle_swapping_keys_fails_the_handshake() -> None:
    phone, laptop = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    a = Handshake(phone, _pins(_pub(laptop)), initiator=True)
    b = Handshake(laptop, _pins(_pub(phone)), initiator=False)
    mallory = Handshake(Ed25519PrivateKey.generate(), _pins(), initiator=True)
    a.hello()
    [hello_m] = FrameReader().feed(mallory.hello())  # Mallory's ephemeral key to the laptop
    [reply] = FrameReader().feed(b.reply(hello_m))
    with pytest.raises(ChannelError, match="handshake failed"):
        a.finish(reply)  # the phone's own key exchange does not match


def test_a_long_message_spans_frames_and_a_cut_one_is_refused() -> None:
    phone, laptop = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    a, b = _connect(phone, laptop, _pins(_pub(laptop)), _pins(_pub(phone)))
    big = {"type": "delta", "entries": ["x" * 100] * 2000}
    frames = FrameReader().feed(a.seal(big))
    assert len(frames) == 4 and all(len(f) <= MAX_FRAME for f in frames)
    assert [b.open(f) for f in frames] == [None, None, None, big]
    frames = FrameReader().feed(a.seal(big))
    b.open(frames[0])
    with pytest.raises(ChannelError):
        b.open(frames[2])  # a frame of the message dropped


def test_the_handshake_is_the_noise_protocol() -> None:
    from noise.connection import Keypair, NoiseConnection

    # A plain Noise_XX responder, not covey's, completes a handshake with covey's initiator.
    phone = Ed25519PrivateKey.generate()
    a = Handshake(phone, _pins(), initiator=True, explain_refusal=True)
    other = NoiseConnection.from_name(b"Noise_XX_25519_ChaChaPoly_SHA256")
    other.set_as_responder()
    other.set_keypair_from_private_bytes(Keypair.STATIC, bytes(32 * [7]))
    other.set_prologue(b"covey-sync/2")
    other.start_handshake()
    [hello] = FrameReader().feed(a.hello())
    assert b'"purpose": "sync"' in bytes(other.read_message(hello))
    reply = bytes(other.write_message(b"{}"))
    with pytest.raises(ChannelError, match=r"identity|signature"):
        a.finish(reply)  # a Noise peer without a covey identity is not accepted


def test_oversized_frames_are_refused() -> None:
    with pytest.raises(ChannelError, match="over the limit"):
        FrameReader().feed(struct.pack(">I", MAX_FRAME + 1))
    reader = FrameReader()
    assert reader.feed(b"\0\0") == [] and reader.feed(b"\0\3ab") == []
    assert reader.feed(b"c") == [b"abc"]


@settings(max_examples=300, deadline=None)
@given(noise=st.binary(max_size=300))
def test_fuzzed_input_is_refused_without_a_crash(noise: bytes) -> None:
    phone, laptop = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    b = Handshake(laptop, _pins(_pub(phone)), initiator=False)
    for attempt in (lambda: FrameReader().feed(noise), lambda: b.reply(noise)):
        with contextlib.suppress(ChannelError):
            attempt()
    a = Handshake(phone, _pins(_pub(laptop)), initiator=True)
    a.hello()
    with pytest.raises(ChannelError):
        a.finish(noise)
    _a2, b2 = _connect(phone, laptop, _pins(_pub(laptop)), _pins(_pub(phone)))
    with pytest.raises(ChannelError):
        b2.open(noise)
