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


def _say(console: Console, assistant: object, session: str, text: str) -> int:
    """One chat turn, printed with what was remembered and recalled."""
    from covey.device._chat import Assistant
    from covey.models import SamplingParams

    if not isinstance(assistant, Assistant):
        raise TypeError("an Assistant is needed")
    started = time.perf_counter()
    turn = assistant.respond(session, text, sampling=SamplingParams(max_tokens=32, seed=7))
    reply = "".join(turn)
    console.print(f"  you: {text}", markup=False)
    console.print(f"  pod: {reply}  ({time.perf_counter() - started:.2f} s, first token "
                  f"{turn.timings.get('first_token_s', 0) * 1000:.0f} ms)", markup=False)
    for fact in turn.explanation.learned:
        console.print(f"       remembered: {fact}", markup=False, style="green")
    for memory in turn.explanation.memories:
        found = assistant.pod.memories.get(memory["id"])
        if found is not None:
            console.print(f"       recalled #{memory['id']}: {found.text}", markup=False,
                          style="cyan")
    for pref in turn.explanation.preferences:
        console.print(f"       knows: {pref}", markup=False, style="cyan")
    return turn.reply_message_id


def run(console: Console | None = None) -> None:
    """Create a pod, chat across sessions, correct, forget, export, and crypto-shred it."""
    from covey.device._chat import open_assistant
    from covey.device._feedback import give_feedback, set_consent

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

        console.print(Rule("2. chat (on-device int8 model), remembering what you say"))
        with Pod.open(home, passphrase) as pod:
            started = time.perf_counter()
            assistant = open_assistant(pod, progress=console.print)
            console.print(f"  model and embedder ready in {time.perf_counter() - started:.2f} s")
            monday = assistant.new_session()
            _say(console, assistant, monday, "hi! my name is Maya.")
            _say(console, assistant, monday, "My sister is Ana and she is visiting next week.")
            _say(console, assistant, monday, "I love spicy food.")

        console.print(Rule("3. a later session: the pod still knows (memory recalled)"))
        with Pod.open(home, passphrase) as pod:
            assistant = open_assistant(pod)
            friday = assistant.new_session()
            _say(console, assistant, friday, "what should I cook for my sister?")
            _say(console, assistant, friday, "actually I hate spicy food now.")
            tastes = [f.sentence() for f in assistant.graph.current() if "spicy" in f.value]
            console.print(f"  preference updated: {tastes}")

            console.print(Rule("4. feedback: a correction becomes a training example"))
            set_consent(pod, "federated_training", True)
            result = give_feedback(pod, correction="Make her a mild mushroom risotto.")
            console.print(f"  correction stored as training example #{result.example_id} "
                          f"(consented: {result.consented})")

            console.print(Rule("5. forget a memory"))
            sister = next(h.memory for h in pod.memories.recall("my sister", 3)
                          if "sister" in h.memory.text)
            pod.memories.forget(sister.id)
            left = [h.memory.text for h in pod.memories.recall("sister", 3)]
            console.print(f"  forgot #{sister.id} ({sister.text!r}); recall for 'sister' now: "
                          f"{left}", markup=False)

            console.print(Rule("6. status and export (your right of access)"))
            status = pod.status()
            console.print(f"  {status.counts['memories']} memories, "
                          f"{status.counts['messages']} messages, "
                          f"{status.counts['training_examples']} training examples; "
                          f"audit chain intact: {status.audit_chain['ok']}")
            export_file = Path(tmp) / "export.json"
            size = pod.write_export(export_file)
            document = json.loads(export_file.read_text(encoding="utf-8"))
            console.print(f"  export: {size:,} bytes, {len(document['tables']['messages'])} "
                          f"messages, {len(document['audit_log'])} audit entries")
            os.remove(export_file)

        console.print(Rule("7. crypto-shred the pod"))
        removed = Pod.forget(home)
        console.print(f"  data key destroyed, removed {', '.join(removed)}")
        try:
            Pod.open(home, passphrase)
        except Exception as exc:  # the demo shows the user-facing message
            console.print(f"  opening it again: {exc}")
    console.print(Rule("done"))
