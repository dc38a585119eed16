"""The preference graph: what the user is, has and likes, as nodes and edges.

The user is one node; each value ("Ana", "Lisbon", "coffee") is a node; a relation is
an edge from the user to the value. Edges are never updated in place: a newer fact
*supersedes* the edges it contradicts (``superseded_at`` is set), so the graph keeps
its history while :meth:`PreferenceGraph.current` shows only what holds now.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import sqlcipher3.dbapi2 as sqlite

from covey._time import utc_timestamp
from covey.device.assistant._facts import Fact
from covey.device.store._store import Store

__all__ = ["GraphFact", "PreferenceGraph"]

_USER = ("person", "user")
_TASTES = ("likes", "dislikes")


@dataclass(frozen=True)
class GraphFact:
    """A current edge: ``relation`` of the user is ``value``."""

    edge_id: int
    relation: str
    value: str
    created_at: str
    provenance: dict[str, Any]

    def sentence(self) -> str:
        """The fact as a short line for a prompt."""
        if self.relation in _TASTES:
            return f"{'likes' if self.relation == 'likes' else 'dislikes'} {self.value}"
        return f"{self.relation.replace('_', ' ')}: {self.value}"



def _node(conn: sqlite.Connection, kind: str, label: str, now: str) -> int:
    conn.execute(
        "INSERT INTO graph_nodes (kind, label, created_at, updated_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (kind, label) DO UPDATE SET updated_at = excluded.updated_at",
        (kind, label, now, now),
    )
    row = conn.execute("SELECT id FROM graph_nodes WHERE kind = ? AND label = ?",
                       (kind, label)).fetchone()
    return int(row[0])


class PreferenceGraph:
    """The user's facts and tastes, in the pod's encrypted store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def assert_fact(self, conn: sqlite.Connection, fact: Fact,
                    provenance: dict[str, Any]) -> list[dict[str, Any]]:
        """Record ``fact`` inside the caller's transaction; returns superseded provenances."""
        now = utc_timestamp()
        user = _node(conn, *_USER, now)
        value = _node(conn, "entity", fact.value.lower(), now)
        if fact.functional:
            clash = conn.execute(
                "SELECT e.id, e.provenance, n.label FROM graph_edges e JOIN graph_nodes n"
                " ON n.id = e.dst WHERE e.src = ? AND e.relation = ? AND e.superseded_at IS NULL",
                (user, fact.relation)).fetchall()
        else:
            relations = _TASTES if fact.relation in _TASTES else (fact.relation,)
            marks = ", ".join("?" * len(relations))
            clash = conn.execute(
                "SELECT e.id, e.provenance, n.label FROM graph_edges e JOIN graph_nodes n"  # noqa: S608
                " ON n.id = e.dst WHERE e.src = ? AND e.dst = ? AND e.superseded_at IS NULL"
                f" AND e.relation IN ({marks})", (user, value, *relations)).fetchall()
        superseded = []
        for edge_id, prov, label in clash:
            conn.execute("UPDATE graph_edges SET superseded_at = ? WHERE id = ?", (now, edge_id))
            superseded.append({**json.loads(prov), "value": label})
        conn.execute(
            "INSERT INTO graph_edges (src, dst, relation, provenance, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (user, value, fact.relation, json.dumps({**provenance, "display": fact.value}), now),
        )
        return superseded

    def current(self) -> list[GraphFact]:
        """Edges that hold now, newest first."""
        rows = self._store.query(
            "SELECT e.id, e.relation, e.provenance, e.created_at FROM graph_edges e"
            " WHERE e.superseded_at IS NULL ORDER BY e.id DESC")
        facts = []
        for r in rows:
            prov = json.loads(r["provenance"])
            facts.append(GraphFact(int(r["id"]), r["relation"], str(prov.get("display", "")),
                                   r["created_at"], prov))
        return facts

    def lookup(self, relation: str) -> GraphFact | None:
        """The current value of a relation, if any."""
        return next((f for f in self.current() if f.relation == relation), None)
