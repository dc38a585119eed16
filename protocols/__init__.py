"""Protocols between covey's parts: the signed model version now; discovery, pairing,
identity, sync and CRDT state follow.

Public surface:
    ModelVersion     a signed global adapter version (the record pods verify)
    verify_version   check a version's signature and the hash of its adapter bytes
    SignatureError   raised when either check fails
    make_node_key    the key pair a pod's SuperNode authenticates with
"""

from covey.protocols._model_version import ModelVersion, SignatureError, verify_version
from covey.protocols._node_key import make_node_key

__all__ = ["ModelVersion", "SignatureError", "make_node_key", "verify_version"]
