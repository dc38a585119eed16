"""The conversation data: `chitchat-dataset`, split into a public and a federated share.

Who is in which share is decided by a stable hash of the user id, so every machine and
every run agrees without a list:

- *public* users (30 %): their turns train the tokenizer and the base model; a tenth of
  them (by a second hash) are held out for server-side evaluation.
- *federated* users (70 %): one pod each. A pod holds the user's turns as examples
  (what the partner said just before, and the user's reply); each user's examples are
  split by time into train (first 80 %) and test (last 20 %).

The base model never sees a federated user's words: public pretraining keeps only turns
written by public users, and public evaluation contexts are blanked when the partner is
federated. Inside a pod, the context of an example is what the partner said to this user;
those words are the partner's, seen by this user, so they can appear in two pods (the
partner's own and this one). DP accounting is per pod.
"""

from __future__ import annotations

import functools
import hashlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Corpus",
    "Example",
    "FederatedUser",
    "load_corpus",
    "share_of",
]

PUBLIC_FRACTION = 0.30
PUBLIC_EVAL_FRACTION = 0.10
TEST_FRACTION = 0.20
MAX_CONTEXT_CHARS = 300
_SALT = "covey-split-v1"


def _unit_hash(text: str) -> float:
    digest = hashlib.sha256(f"{_SALT}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def share_of(user_id: str) -> str:
    """``"public"`` or ``"federated"``: the share a user belongs to, forever."""
    return "public" if _unit_hash(user_id) < PUBLIC_FRACTION else "federated"


def is_public_eval(user_id: str) -> bool:
    """Whether a public user is held out of pretraining for evaluation."""
    return share_of(user_id) == "public" and _unit_hash("eval:" + user_id) < PUBLIC_EVAL_FRACTION


@dataclass(frozen=True)
class Example:
    """One turn of a user: what was said just before (may be empty) and the reply."""

    context: str
    reply: str
    timestamp: str


@dataclass(frozen=True)
class FederatedUser:
    """A federated user's examples, split by time."""

    user_id: str
    train: tuple[Example, ...]
    test: tuple[Example, ...]


@dataclass(frozen=True)
class Corpus:
    """The whole split: public dialogues and evaluation examples, and federated users."""

    public_dialogues: tuple[tuple[tuple[str, str], ...], ...]  # ((role, text), ...) each
    public_eval: tuple[Example, ...]
    federated: tuple[FederatedUser, ...]

    def public_texts(self) -> list[str]:
        """Every public pretraining turn's text (for the tokenizer)."""
        return [text for dialogue in self.public_dialogues for _, text in dialogue]

    def statistics(self) -> dict[str, Any]:
        """Counts a reader needs to judge the split."""
        per_user = sorted(len(u.train) + len(u.test) for u in self.federated)
        turns = sum(len(d) for d in self.public_dialogues)
        chars = sum(len(t) for t in self.public_texts())
        return {
            "source": "chitchat-dataset",
            "public_fraction": PUBLIC_FRACTION,
            "public_dialogues": len(self.public_dialogues),
            "public_turns": turns,
            "public_chars": chars,
            "public_eval_examples": len(self.public_eval),
            "federated_users": len(self.federated),
            "federated_examples": sum(per_user),
            "federated_train_examples": sum(len(u.train) for u in self.federated),
            "federated_test_examples": sum(len(u.test) for u in self.federated),
            "examples_per_user": {
                "min": per_user[0] if per_user else 0,
                "median": per_user[len(per_user) // 2] if per_user else 0,
                "max": per_user[-1] if per_user else 0,
            },
            "federated_users_with_20_or_more": sum(1 for n in per_user if n >= 20),
        }


def _turns(conversation: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(sender, text, first timestamp) per turn, utterances of a turn joined by spaces."""
    turns = []
    for turn in conversation.get("messages", []):
        parts = [u["text"].strip() for u in turn if u.get("text", "").strip()]
        if parts:
            turns.append((turn[0]["sender"], " ".join(parts), turn[0]["timestamp"]))
    return turns


def _clip_context(text: str) -> str:
    return text if len(text) <= MAX_CONTEXT_CHARS else text[-MAX_CONTEXT_CHARS:]


def _split_by_time(user_id: str, examples: list[Example]) -> FederatedUser:
    # Python's sort is stable: same-second turns keep the dataset's order.
    examples.sort(key=lambda e: e.timestamp)
    cut = len(examples) - max(1, round(len(examples) * TEST_FRACTION)) if len(examples) > 1 else 1
    return FederatedUser(user_id, tuple(examples[:cut]), tuple(examples[cut:]))


def build_corpus(conversations: dict[str, dict[str, Any]]) -> Corpus:
    """Split raw chitchat conversations (``chitchat_dataset.Dataset()``) into the shares."""
    dialogues: list[tuple[tuple[str, str], ...]] = []
    public_eval: list[Example] = []
    federated: dict[str, list[Example]] = defaultdict(list)
    for conv_id in sorted(conversations):
        turns = _turns(conversations[conv_id])
        if not turns:
            continue
        first = turns[0][0]
        pretrain: list[tuple[str, str]] = []
        previous: tuple[str, str] | None = None
        for sender, text, stamp in turns:
            context = previous[1] if previous and previous[0] != sender else ""
            if share_of(sender) == "federated":
                federated[sender].append(Example(_clip_context(context), text, stamp))
            elif is_public_eval(sender):
                public_context = context if previous and share_of(previous[0]) == "public" else ""
                public_eval.append(Example(_clip_context(public_context), text, stamp))
            else:
                pretrain.append(("user" if sender == first else "assistant", text))
            previous = (sender, text)
        if pretrain:
            dialogues.append(tuple(pretrain))
    users = tuple(_split_by_time(uid, federated[uid]) for uid in sorted(federated))
    return Corpus(tuple(dialogues), tuple(public_eval), users)


@functools.lru_cache(maxsize=1)
def load_corpus() -> Corpus:
    """Load `chitchat-dataset` (shipped in its pip package, no download) and split it."""
    import chitchat_dataset

    return build_corpus(chitchat_dataset.Dataset())
