"""`covey demo`: the main job end to end on a throwaway pod, each step printed."""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

from rich.console import Console
from rich.rule import Rule

from covey._tempdirs import temporary_directory
from covey.device import Pod

__all__ = ["run"]


def _say(console: Console, assistant: object, session: str, text: str) -> int:
    """One chat turn, printed with what was remembered and recalled."""
    from covey.device import Assistant
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


def _federate(console: Console, home: Path, passphrase: str, tmp: Path) -> Path:
    """Two more pods and the demo pod train the shared adapter on a loopback SuperLink."""
    from concurrent.futures import ThreadPoolExecutor

    from covey._processes import free_port
    from covey.aggregator import AggregatorHome
    from covey.device import join, leave, node_key, spent
    from covey.models import load_corpus
    from covey.privacy import DPConfig
    from covey.simulations import seed_pods

    agg = AggregatorHome(tmp / "aggregator")
    agg.make_certs()
    started = time.perf_counter()
    status = agg.start(port=free_port())
    console.print(f"  aggregator: SuperLink on {status['superlink']} with TLS and node "
                  f"authentication ({time.perf_counter() - started:.1f} s)")
    users = [u for u in load_corpus().federated if len(u.train) >= 20][:2]
    pods = [home, *seed_pods(tmp, users, passphrase, prefix="other-device-")]
    try:
        for p in pods:
            agg.admit(node_key(p))
        with ThreadPoolExecutor(len(pods)) as pool:
            list(pool.map(lambda p: join(p, passphrase, status["superlink"], agg.root_cert,
                                         agg.registry().public_key_path), pods))
        console.print(f"  {len(pods)} pods admitted and joined (one SuperNode each)")
        rounds, target = 2, 8.0
        z = DPConfig(delta=1e-5).solved(target, rounds).noise_multiplier
        config = {"run-name": f"demo-{secrets.token_hex(3)}", "rounds": rounds,
                  "mode": "central", "noise-multiplier": z, "target-epsilon": target,
                  "min-pods": len(pods), "eval-examples": 60}
        console.print(f"  training: {rounds} rounds, central DP, z={z:.3f} solved for "
                      f"epsilon {target:g} at delta 1e-5, clip C=1")

        def show(stats: dict[str, object]) -> None:
            rolled = (f"; quality fell >10 %, rolled back to {stats['rolled_back_to']}"
                      if "rolled_back_to" in stats else "")
            console.print(f"    round {stats['round']}: {stats['accepted']} updates, "
                          f"held-out perplexity {stats.get('perplexity')}, epsilon "
                          f"{float(str(stats['epsilon'])):.3f}{rolled}")

        record = agg.train(config, on_round=show)
        console.print(f"  run done: epsilon {record['epsilon']:.3f} at delta "
                      f"{record['delta']:g} (RDP; PRV says "
                      f"{record['epsilon_check']['epsilon']:.3f}); model version "
                      f"{record['final_version']}, signed by the aggregator")
        with Pod.open(home, passphrase) as pod:
            console.print(f"  this pod's ledger: epsilon {spent(pod):.3f} spent of "
                          "its user's maximum 10 (it refuses rounds past that)")
        console.print("  (three pods cannot outvote the noise: DP needs many users; "
                      "see `make bench` and the README)", style="dim")
        return agg.run_record(str(record["run_id"]))
    finally:
        for p in pods:
            leave(p)
        agg.stop()


def _audit(console: Console, pod: Pod, run_record: Path) -> None:
    """Write the pod's report and the federated run's report where the user can open them."""
    from covey.device import pod_audit
    from covey.privacy import pod_report, write_report
    from covey.simulations import audit_run

    folder = Path(os.environ.get("COVEY_DEMO_REPORTS", "covey-demo-reports")).resolve()
    started = time.perf_counter()
    report = pod_report(pod_audit(pod))
    html, _ = write_report(report, folder / "pod-report.html")
    console.print(f"  pod report: {len(report['red_flags'])} red flags, "
                  f"{report['summary']['files_scanned']} files scanned for your text "
                  f"({time.perf_counter() - started:.1f} s)")
    console.print(f"    {html} (+ .json)")
    report = audit_run(run_record)
    html, _ = write_report(report, folder / "run-report.html")
    console.print(f"  run report: {len(report['red_flags'])} red flags; epsilon "
                  f"{report['summary']['epsilon']:.3f} rechecked by the other accountant: "
                  f"{report['summary']['epsilon_check']:.3f}")
    console.print(f"    {html} (+ .json)")
    console.print("  (the run report's empirical tests, canaries and membership inference, "
                  "take about 3 minutes: `covey audit --run DIR`)", style="dim")


def run(console: Console | None = None) -> None:
    """Create a pod, chat across sessions, correct, forget, export, and crypto-shred it."""
    from covey.device import give_feedback, open_assistant, set_consent

    console = console or Console()
    passphrase = secrets.token_urlsafe(16)
    with temporary_directory("covey-demo-") as tmp:
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

        console.print(Rule("5. a federated round: pods improve a shared model, privately"))
        run_record = _federate(console, home, passphrase, Path(tmp))

        with Pod.open(home, passphrase) as pod:
            console.print(Rule("6. forget a memory"))
            sister = next(h.memory for h in pod.memories.recall("my sister", 3)
                          if "sister" in h.memory.text)
            pod.memories.forget(sister.id)
            left = [h.memory.text for h in pod.memories.recall("sister", 3)]
            console.print(f"  forgot #{sister.id} ({sister.text!r}); recall for 'sister' now: "
                          f"{left}", markup=False)

            console.print(Rule("7. status and export (your right of access)"))
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

            console.print(Rule("8. privacy audit reports"))
            _audit(console, pod, run_record)

        console.print(Rule("9. crypto-shred the pod"))
        removed = Pod.forget(home)
        console.print(f"  data key destroyed, removed {', '.join(removed)}")
        try:
            Pod.open(home, passphrase)
        except Exception as exc:  # the demo shows the user-facing message
            console.print(f"  opening it again: {exc}")
    console.print(Rule("done"))
