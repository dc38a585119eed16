"""Protocols between covey's parts: the round message between the aggregator and the
pods, the signed model version, and the replicated state of one user's pods (hybrid
logical clocks, a last-writer-wins map with tombstones); discovery, pairing and the sync
channel follow.

Public surface:
    ModelVersion     a signed global adapter version (the record pods verify)
    RoundMessage, RoundReply, Refusal   the round protocol (ROUND-PROTOCOL.md): what
                     the aggregator sends, what a pod answers, why it refuses
    REFUSALS, REFUSAL_CODE   refusal codes, and the error code that carries them
    round_bytes, verify_round   the signed bytes of a round's settings, and their check
    verify_version   check a version's signature and the hash of its adapter bytes
    SignatureError   raised when either check fails
    make_node_key    the key pair a pod's SuperNode authenticates with
    HLC, HybridClock hybrid logical timestamps and the clock that issues them
    Replica, Delta, Entry, MergeResult   a pod's copy of the shared state (signed
                     entries), what a peer lacks of it, and what a merge did
    Schema, Collection, lww, grow_only   how each collection merges (register one more
                     with ``user_schema(grow_only(name, verify=...))``)
    UserTrust, USER_SCHEMA, user_schema, user_trust   who may write a user's state
    UserKey, DeviceCertificate, Revocation   the user key (a chain) and what it signs
    pairing_codes    the 6-digit codes each device shows, and types, when pairing
    Handshake, SecureChannel, ChannelError   the authenticated, encrypted sync channel
    Announcer, discover, Peer                mDNS announcement and discovery of pods
    SyncServer, sync_with, SyncStats         a sync session over TCP, and what it moved
"""

from covey.protocols._channel import ChannelError, Handshake, SecureChannel
from covey.protocols._crdt import (
    Collection,
    Delta,
    Entry,
    MergeResult,
    Refused,
    Replica,
    Schema,
    grow_only,
    lww,
)
from covey.protocols._discovery import Announcer, Browser, Peer, discover, local_addresses
from covey.protocols._hlc import HLC, HybridClock
from covey.protocols._identity import (
    DeviceCertificate,
    Revocation,
    UserKey,
    b64,
    device_id_of,
    pairing_codes,
    unb64,
)
from covey.protocols._model_version import ModelVersion, SignatureError, verify_version
from covey.protocols._node_key import make_node_key
from covey.protocols._round import (
    REFUSAL_CODE,
    REFUSALS,
    Refusal,
    RoundMessage,
    RoundReply,
    round_bytes,
    verify_round,
)
from covey.protocols._session import (
    Pairing,
    PairingBroken,
    PairResult,
    RefusedError,
    SyncServer,
    SyncStats,
    pair_with,
    sync_with,
)
from covey.protocols._trust import KEPT, USER_SCHEMA, UserTrust, revoke, user_schema, user_trust
from covey.protocols._trusted_app import app_key_id, trusted_entities

__all__ = [
    "HLC",
    "KEPT",
    "REFUSALS",
    "REFUSAL_CODE",
    "USER_SCHEMA",
    "Announcer",
    "Browser",
    "ChannelError",
    "Collection",
    "Delta",
    "DeviceCertificate",
    "Entry",
    "Handshake",
    "HybridClock",
    "MergeResult",
    "ModelVersion",
    "PairResult",
    "Pairing",
    "PairingBroken",
    "Peer",
    "Refusal",
    "Refused",
    "RefusedError",
    "Replica",
    "Revocation",
    "RoundMessage",
    "RoundReply",
    "Schema",
    "SecureChannel",
    "SignatureError",
    "SyncServer",
    "SyncStats",
    "UserKey",
    "UserTrust",
    "app_key_id",
    "b64",
    "device_id_of",
    "discover",
    "grow_only",
    "local_addresses",
    "lww",
    "make_node_key",
    "pair_with",
    "pairing_codes",
    "revoke",
    "round_bytes",
    "sync_with",
    "trusted_entities",
    "unb64",
    "user_schema",
    "user_trust",
    "verify_round",
    "verify_version",
]
