"""Device-to-device protocols: discovery, pairing, identity, sync and CRDT state.

Nothing is public yet; see the open issue for cross-device sync.
"""

__all__: list[str] = []
