"""One user's devices as the protocol layer sees them: device keys, a user key, replicas
whose trust is that user's (real Ed25519 keys and signatures throughout)."""

from __future__ import annotations

from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from covey.protocols._crdt import Entry, Replica, Schema
from covey.protocols._hlc import HybridClock
from covey.protocols._identity import UserKey, device_id_of
from covey.protocols._trust import USER_SCHEMA, UserTrust, revoke, user_trust


def public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


class Household:
    """Devices ``names`` of one user; the first made the user key and certified the rest.

    ``clock(name)``: the physical clock (milliseconds) of device ``name``.
    """

    def __init__(self, names: tuple[str, ...], schema: Schema = USER_SCHEMA,
                 clock: Callable[[str], Callable[[], int]] | None = None) -> None:
        self.names = names
        self.keys = {n: Ed25519PrivateKey.generate() for n in names}
        self.ids = {n: device_id_of(public(k)) for n, k in self.keys.items()}
        self.user = UserKey.generate_for(public(self.keys[names[0]]))
        self.replicas = {n: Replica(self.ids[n], schema, signer=self.keys[n],
                                    trust=user_trust(self.user.user_id),
                                    clock=HybridClock(self.ids[n], clock(n)) if clock else None)
                         for n in names}
        founder = self.replicas[names[0]]
        self.certificates = [founder.add("devices", self.user.certify(
            public(self.keys[n]), n).to_dict()) for n in names]
        for n in names[1:]:
            result = self.replicas[n].merge_entries(self.certificates)
            assert not result.refused, result.refused

    def __getitem__(self, name: str) -> Replica:
        return self.replicas[name]

    def trust(self, name: str) -> UserTrust:
        trust = self.replicas[name].trust()
        assert isinstance(trust, UserTrust)
        return trust

    def revoke(self, by: str, victim: str, reason: str = "lost") -> list[Entry]:
        """``by`` revokes ``victim`` and moves the others to a new user key (what
        PodState.revoke does); the entries it wrote (the kept lists, the revocation, the
        certificates by the new key)."""
        _, successor, written = revoke(self.replicas[by], self.user, self.ids[victim], reason)
        self.old_user, self.user = self.user, successor
        return written
