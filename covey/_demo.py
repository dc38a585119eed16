"""`covey demo`: the main job end to end on a throwaway pod, each step printed."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.rule import Rule

from covey.device import Pod

__all__ = ["run"]

_MEMORIES = [
    ("My sister Ana lives in Lisbon.", "fact"),
    ("I prefer vegetarian food.", "preference"),
    ("Dentist appointment on Friday at 10.", "note"),
    ("I am learning to play the cello.", "fact"),
]


def _model_step(console: Console) -> None:
    """Answer a greeting with the shipped int8 ONNX model (no training, no download)."""
    from covey.models import ChatMessage, SamplingParams, create_generator

    started = time.perf_counter()
    generator = create_generator("onnx")
    console.print(f"  loaded and verified the model in {time.perf_counter() - started:.2f} s")
    for prompt in ("hi!", "what do you like to do on weekends?"):
        started = time.perf_counter()
        reply = "".join(generator.stream_chat([ChatMessage("user", prompt)],
                                              SamplingParams(max_tokens=32, seed=7)))
        console.print(f"  you: {prompt}\n  pod: {reply.strip()}  "
                      f"({time.perf_counter() - started:.2f} s)", markup=False)


def run(console: Console | None = None) -> None:
    """Create a pod in a temporary folder, use it, export it, and crypto-shred it."""
    console = console or Console()
    passphrase = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="covey-demo-") as tmp:
        home = Path(tmp) / "pod"
        console.print(Rule("1. create an encrypted pod"))
        started = time.perf_counter()
        with Pod.create(home, passphrase, name="demo") as pod:
            console.print(f"pod {pod.pod_id} at {home}, device {pod.identity.device_id}")
            console.print(f"created in {time.perf_counter() - started:.2f} s "
                          "(Argon2id key wrap, SQLCipher store)")

        console.print(Rule("2. unlock and remember"))
        started = time.perf_counter()
        with Pod.open(home, passphrase) as pod:
            console.print(f"unlocked in {time.perf_counter() - started:.2f} s")
            for text, kind in _MEMORIES:
                memory = pod.memories.add(text, kind=kind)
                console.print(f"  #{memory.id} ({kind}) {text}", markup=False)

            console.print(Rule("3. status"))
            status = pod.status()
            console.print(f"store: {status.cipher['engine']}; key wrap: Argon2id "
                          f"m={status.kdf['memory_kib']} KiB t={status.kdf['time_cost']}")
            console.print(f"memories: {status.counts['memories']}, audit entries: "
                          f"{status.counts['audit_log']}, chain intact: "
                          f"{status.audit_chain['ok']}")

            console.print(Rule("4. search"))
            for query in ("sister", "what food do I like"):
                hits = pod.memories.search(query, limit=2)
                console.print(f"  {query!r} -> " + "; ".join(h.memory.text for h in hits))

            console.print(Rule("5. forget one memory"))
            pod.memories.forget(3)
            console.print(f"  forgot #3; {pod.memories.count()} memories left")

            console.print(Rule("6. export (your right of access)"))
            export_file = Path(tmp) / "export.json"
            size = pod.write_export(export_file)
            document = json.loads(export_file.read_text(encoding="utf-8"))
            console.print(f"  {size:,} bytes, {len(document['tables']['memories'])} memories, "
                          f"{len(document['audit_log'])} audit entries")
            os.remove(export_file)

        console.print(Rule("7. the built-in model, on device"))
        _model_step(console)

        console.print(Rule("8. crypto-shred the pod"))
        removed = Pod.forget(home)
        console.print(f"  data key destroyed, removed {', '.join(removed)}")
        try:
            Pod.open(home, passphrase)
        except Exception as exc:  # the demo shows the user-facing message
            console.print(f"  opening it again: {exc}")
    console.print(Rule("done"))
