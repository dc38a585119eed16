"""Compaction: keep the pod's store within a configured size.

Two steps, cheapest first: (1) near-duplicate memories merge (the newest wording wins);
(2) when the conversation history is still over its limit, the oldest conversations are
summarized extractively (their most informative user sentences become one ``summary``
memory) and their messages are erased. Extractive on purpose: every word of a summary
is the user's own, so nothing is invented about them.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

from covey.device._pod import Pod
from covey.device.store import _audit

__all__ = ["CompactionReport", "compact", "extractive_summary"]

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[a-z']+")


@dataclass(frozen=True)
class CompactionReport:
    """What compaction did."""

    merged_memories: int
    summarized_conversations: int
    erased_messages: int
    summaries: list[int]


def extractive_summary(texts: list[str], max_sentences: int = 3, max_chars: int = 400) -> str:
    """The ``max_sentences`` most informative sentences of ``texts``, in their order.

    A sentence scores the mean inverse frequency of its words across ``texts``, so rare,
    specific words win over small talk ("ok", "haha").
    """
    sentences = [s.strip() for t in texts for s in _SENTENCE.split(t) if len(s.split()) >= 3]
    if not sentences:
        return ""
    docs = [set(_WORD.findall(s.lower())) for s in sentences]
    df = Counter(w for d in docs for w in d)
    n = len(sentences)
    scores = [sum(math.log(1 + n / df[w]) for w in d) / (len(d) or 1) for d in docs]
    best = sorted(sorted(range(n), key=lambda i: -scores[i])[:max_sentences])
    summary = " ".join(sentences[i] for i in best)
    return summary[:max_chars]


def _merge_duplicates(pod: Pod) -> int:
    memories = sorted(pod.memories.all(), key=lambda m: m.id)
    merged = 0
    seen: set[int] = set()
    for memory in memories:
        if memory.id in seen:
            continue
        for hit in pod.memories.recall(memory.text, 5):
            other = hit.memory
            if other.id != memory.id and other.kind == memory.kind and other.id not in seen \
                    and other.text.strip(".! ").lower() == memory.text.strip(".! ").lower():
                # The newer wording (higher id) survives.
                pod.memories.forget(min(other.id, memory.id))
                seen.add(min(other.id, memory.id))
                merged += 1
    return merged


def compact(pod: Pod, max_messages: int = 5000, keep_recent: int = 500) -> CompactionReport:
    """Merge duplicate memories, then summarize and erase the oldest conversations.

    Raises:
        ValueError: ``keep_recent`` above ``max_messages`` or negative limits.
    """
    if not 0 <= keep_recent <= max_messages:
        raise ValueError("need 0 <= keep_recent <= max_messages")
    merged = _merge_duplicates(pod) if pod.memories._embedder is not None else 0
    history = pod.conversations
    summaries: list[int] = []
    erased = conversations = 0
    if history.count() > max_messages:
        cutoff = history.cutoff(keep_recent)
        for conv in history.conversations_up_to(cutoff):
            summary = extractive_summary(history.user_texts(conv, cutoff))
            with pod.store.transaction() as c:
                if summary:
                    summaries.append(pod.memories.insert(c, summary, "summary", {
                        "source": "compaction", "conversation_id": conv,
                        "at": datetime.now(UTC).isoformat(timespec="seconds")}))
                erased += history.erase_up_to(c, conv, cutoff)
            conversations += 1
    if merged or erased:
        with pod.store.transaction() as c:
            _audit.append(c, "compaction", detail={"merged": merged, "erased_messages": erased,
                                                   "summaries": len(summaries)})
        pod.store.checkpoint()
    return CompactionReport(merged, conversations, erased, summaries)

