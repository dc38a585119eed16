"""Protocols between covey's parts: the signed model version, and the replicated state
of one user's pods (hybrid logical clocks, a last-writer-wins map with tombstones);
discovery, pairing and the sync channel follow.

Public surface:
    ModelVersion     a signed global adapter version (the record pods verify)
    verify_version   check a version's signature and the hash of its adapter bytes
    SignatureError   raised when either check fails
    make_node_key    the key pair a pod's SuperNode authenticates with
    HLC, HybridClock hybrid logical timestamps and the clock that issues them
    Replica, Delta   a pod's copy of the shared state, and what a peer lacks of it
    UserKey, DeviceCertificate, Revocation   the user identity key and what it signs
    short_auth_string                        the 6 digits both screens show when pairing
    Handshake, SecureChannel, ChannelError   the authenticated, encrypted sync channel
    Announcer, discover, Peer                mDNS announcement and discovery of pods
    SyncServer, sync_with, SyncStats         a sync session over TCP, and what it moved
"""

from covey.protocols._channel import ChannelError, Handshake, SecureChannel
from covey.protocols._crdt import Delta, Replica
from covey.protocols._discovery import Announcer, Peer, discover
from covey.protocols._hlc import HLC, HybridClock
from covey.protocols._identity import DeviceCertificate, Revocation, UserKey, short_auth_string
from covey.protocols._model_version import ModelVersion, SignatureError, verify_version
from covey.protocols._node_key import make_node_key
from covey.protocols._session import SyncServer, SyncStats, sync_with

__all__ = ["HLC", "Announcer", "ChannelError", "Delta", "DeviceCertificate", "Handshake",
           "HybridClock", "ModelVersion", "Peer", "Replica", "Revocation", "SecureChannel",
           "SignatureError", "SyncServer", "SyncStats", "UserKey", "discover", "make_node_key",
           "short_auth_string", "sync_with", "verify_version"]
