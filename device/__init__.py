"""The pod: keys, the encrypted store, memories, conversations, chat and feedback; its
local API is the subpackage ``covey.device.api`` (imported only to serve).

Public surface:
    Pod              create, open, export, restore and crypto-shred a pod
    PodConfig        the pod's settings (frozen; TOML and COVEY_* variables)
    PodStatus        what `covey pod status` reports
    DeviceIdentity   the device's Ed25519 identity
    KdfParams        Argon2id parameters for wrapping the data key
    Memory, MemoryHit, MEMORY_KINDS
    default_home     where a pod lives when no --home or COVEY_HOME is given

Importing this package is light: no server, model or Flower import happens here.
"""

from covey.device._pod import DeviceIdentity, Pod, PodStatus
from covey.device.memory._memory import MEMORY_KINDS, Memory, MemoryHit
from covey.device.store._config import PodConfig
from covey.device.store._home import default_home, resolve_home
from covey.device.store._keys import KdfParams

__all__ = [
    "MEMORY_KINDS",
    "DeviceIdentity",
    "KdfParams",
    "Memory",
    "MemoryHit",
    "Pod",
    "PodConfig",
    "PodStatus",
    "default_home",
    "resolve_home",
]
