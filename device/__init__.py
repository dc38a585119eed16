"""The pod: one user's encrypted home on one device, and its rooms (store/, memory/,
assistant/, safety/, api/, federation/, sync/, context/, cli/; see ARCHITECTURE.md).

Public surface:
    Pod              create, open, export, restore and crypto-shred a pod
    PodConfig        the pod's settings (frozen; TOML and COVEY_* variables)
    PodStatus        what `covey pod status` reports
    DeviceIdentity   the device's Ed25519 identity
    KdfParams        Argon2id parameters for wrapping the data key
    Memory, MemoryHit, MEMORY_KINDS
    default_home     where a pod lives when no --home or COVEY_HOME is given
and, imported when first used, what the demo, the simulator, the benchmarks and the
audit take from the rooms: the assistant (Assistant, open_assistant, give_feedback,
set_consent), taking part in rounds (take_part, join_run, RoundRequest, join, leave,
spent, ...), memory and vector recall, sync, context capture, the safety filter and
the pod's audit facts (pod_audit).

Importing this package is light: no server, model or Flower import happens here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from covey._lazy import lazy_attribute
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

# Imported when first used, so that importing the package stays light.
_LAZY = {
    "Assistant": "assistant._chat",
    "Capture": "context._capture",
    "ClientUpdate": "federation._federated",
    "DECAY_FLOOR": "memory._memory",
    "DIMENSION": "memory._vector",
    "EMBEDDING_MODEL": "memory._memory",
    "HALF_LIFE_S": "memory._memory",
    "LoopConfig": "sync._sync_loop",
    "Memories": "memory._memory",
    "MqttSettings": "context._context",
    "PodState": "sync._sync",
    "PromptParts": "assistant._orchestrator",
    "RoundRefused": "federation._participation",
    "RoundRequest": "federation._participation",
    "SYNC_MEMORIES": "sync._sync",
    "SafetyFilter": "safety._safety",
    "Store": "store._store",
    "SyncLoop": "sync._sync_loop",
    "TRAINING_CONSENT": "assistant._feedback",
    "TextEmbedder": "memory._memory",
    "VectorIndex": "memory._vector",
    "VectorIndexConfig": "memory._vector",
    "assemble": "assistant._orchestrator",
    "enable": "context._context",
    "encode_vector": "memory._vector",
    "fts_query": "memory._memory",
    "give_feedback": "assistant._feedback",
    "import_examples": "federation._participation",
    "join": "federation._join",
    "join_run": "federation._participation",
    "leave": "federation._join",
    "load_vectors": "memory._vector",
    "new_data_key": "store._keys",
    "node_key": "federation._join",
    "open_assistant": "assistant._chat",
    "pod_audit": "_pod_audit",
    "record_usage": "context._context",
    "release_update": "federation._federated",
    "reply_message": "federation._clientapp",
    "set_budget_policy": "federation._participation",
    "set_consent": "assistant._feedback",
    "spent": "federation._participation",
    "take_part": "federation._participation",
    "train_update": "federation._federated",
    "train_updates": "federation._federated",
    "unwrap": "store._keys",
    "wrap": "store._keys",
}

if TYPE_CHECKING:
    from covey.device._pod_audit import pod_audit as pod_audit
    from covey.device.assistant._chat import Assistant as Assistant
    from covey.device.assistant._chat import open_assistant as open_assistant
    from covey.device.assistant._feedback import TRAINING_CONSENT as TRAINING_CONSENT
    from covey.device.assistant._feedback import give_feedback as give_feedback
    from covey.device.assistant._feedback import set_consent as set_consent
    from covey.device.assistant._orchestrator import PromptParts as PromptParts
    from covey.device.assistant._orchestrator import assemble as assemble
    from covey.device.context._capture import Capture as Capture
    from covey.device.context._context import MqttSettings as MqttSettings
    from covey.device.context._context import enable as enable
    from covey.device.context._context import record_usage as record_usage
    from covey.device.federation._clientapp import reply_message as reply_message
    from covey.device.federation._federated import ClientUpdate as ClientUpdate
    from covey.device.federation._federated import release_update as release_update
    from covey.device.federation._federated import train_update as train_update
    from covey.device.federation._federated import train_updates as train_updates
    from covey.device.federation._join import join as join
    from covey.device.federation._join import leave as leave
    from covey.device.federation._join import node_key as node_key
    from covey.device.federation._participation import RoundRefused as RoundRefused
    from covey.device.federation._participation import RoundRequest as RoundRequest
    from covey.device.federation._participation import import_examples as import_examples
    from covey.device.federation._participation import join_run as join_run
    from covey.device.federation._participation import set_budget_policy as set_budget_policy
    from covey.device.federation._participation import spent as spent
    from covey.device.federation._participation import take_part as take_part
    from covey.device.memory._memory import DECAY_FLOOR as DECAY_FLOOR
    from covey.device.memory._memory import EMBEDDING_MODEL as EMBEDDING_MODEL
    from covey.device.memory._memory import HALF_LIFE_S as HALF_LIFE_S
    from covey.device.memory._memory import Memories as Memories
    from covey.device.memory._memory import TextEmbedder as TextEmbedder
    from covey.device.memory._memory import fts_query as fts_query
    from covey.device.memory._vector import DIMENSION as DIMENSION
    from covey.device.memory._vector import VectorIndex as VectorIndex
    from covey.device.memory._vector import VectorIndexConfig as VectorIndexConfig
    from covey.device.memory._vector import encode_vector as encode_vector
    from covey.device.memory._vector import load_vectors as load_vectors
    from covey.device.safety._safety import SafetyFilter as SafetyFilter
    from covey.device.store._keys import new_data_key as new_data_key
    from covey.device.store._keys import unwrap as unwrap
    from covey.device.store._keys import wrap as wrap
    from covey.device.store._store import Store as Store
    from covey.device.sync._sync import SYNC_MEMORIES as SYNC_MEMORIES
    from covey.device.sync._sync import PodState as PodState
    from covey.device.sync._sync_loop import LoopConfig as LoopConfig
    from covey.device.sync._sync_loop import SyncLoop as SyncLoop


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _LAZY, name, globals())


__all__ = sorted({*__all__, *_LAZY})
