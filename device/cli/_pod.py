"""`covey pod ...` and `covey memory ...`: the pod's command line."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from covey import logs
from covey.device._pod import Pod
from covey.device.memory._memory import MEMORY_KINDS
from covey.device.store._home import resolve_home
from covey.errors import (
    InvalidInputError,
    PassphraseRequiredError,
    PodNotFoundError,
    StoreCorruptError,
)
from covey.privacy import RedactingFilter, UserText

__all__ = ["memory_app", "pod_app"]

pod_app = typer.Typer(help="Create, inspect, export and erase the pod on this device.",
                      no_args_is_help=True)
memory_app = typer.Typer(help="What the pod remembers: add, list, search, forget.",
                         no_args_is_help=True)

out = Console()

HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", envvar="COVEY_HOME", show_envvar=True,
                 help="Pod home folder (default: the platform's user data folder)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def _emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, ensure_ascii=False, indent=2) + "\n")


def passphrase(prompt: str = "Passphrase", *, env: str = "COVEY_PASSPHRASE",
               confirm: bool = False) -> str:
    """The passphrase from ``env``, else a hidden prompt when there is a terminal.

    Raises:
        PassphraseRequiredError: neither is available.
    """
    from covey._processes import secret_from_env

    value = secret_from_env(env)
    if value is not None:
        return value
    if not sys.stdin.isatty():
        raise PassphraseRequiredError()
    return str(typer.prompt(prompt, hide_input=True, confirmation_prompt=confirm))


def home_for(home: Path | None) -> Path:
    """Resolve the pod home and point the log at it."""
    resolved = resolve_home(home)
    logs.configure(resolved if Pod.exists(resolved) else None, redaction=RedactingFilter)
    return resolved


def open_pod(home: Path | None) -> Pod:
    """Unlock the pod for a command."""
    resolved = home_for(home)
    if not Pod.exists(resolved):
        raise PodNotFoundError(resolved)
    return Pod.open(resolved, passphrase())


# -- covey pod ----------------------------------------------------------------------


@pod_app.command("init")
def pod_init(
    home: HomeOpt = None,
    name: Annotated[str | None, typer.Option(help="A name for this pod.")] = None,
    from_export: Annotated[Path | None, typer.Option(
        "--from-export", help="Restore everything from a `covey pod export` file.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an encrypted pod: a new data key, wrapped by your passphrase."""
    resolved = resolve_home(home)
    document = _read_export(from_export) if from_export else None
    secret = passphrase("New passphrase", confirm=True)
    with Pod.create(resolved, secret, name=name) as pod:
        logs.configure(resolved, redaction=RedactingFilter)
        restored = pod.restore(document) if document is not None else {}
        info = {"home": str(resolved), "pod_id": pod.pod_id, "name": pod.name,
                "device_id": pod.identity.device_id, "restored": restored}
    if as_json:
        _emit_json(info)
        return
    out.print(f"[green]Created pod[/] {info['name']!s} at {resolved}")
    out.print(f"  device id  {info['device_id']}")
    if restored:
        out.print(f"  restored   {sum(restored.values())} rows from {from_export}")


def _read_export(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise InvalidInputError(f"no export file at {path}") from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidInputError(f"{path} is not a JSON export") from None
    if not isinstance(document, dict):
        raise InvalidInputError(f"{path} is not a covey export")
    return document


@pod_app.command("status")
def pod_status(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Identity, encryption, counts, and checks of every page and of the audit chain."""
    from covey.device._stop import is_stopped
    from covey.device.context._context import sources
    from covey.device.federation._budget import pod_ledger
    from covey.device.federation._join import node_key, supernode
    from covey.device.sync._sync import PodState

    with open_pod(home) as pod:
        status = pod.status()
        ledger = pod_ledger(pod)
        policy, used, ledger_check = ledger.policy, ledger.spent(), ledger.verify()
        state = PodState(pod)
        key = state.user_key()
        sync = {"user_id": key.user_id if key else None, "devices": len(state.devices())}
        context = [s.name for s in sources(pod, counts=False) if s.active]
        stopped = is_stopped(pod.home)
    chain = status.audit_chain
    node = supernode(Path(status.home))
    federation: dict[str, Any] = {"node_key": str(node_key(Path(status.home))),
                                  "supernode": node,
                  "epsilon_spent": used if used != float("inf") else None,
                  "max_epsilon": policy.max_epsilon, "delta": policy.delta,
                  "ledger": {"ok": ledger_check.ok, "entries": ledger_check.entries,
                             "reason": ledger_check.reason}}
    if as_json:
        _emit_json({**status.to_dict(), "federation": federation, "sync": sync,
                    "context_sources": context, "stopped": stopped})
    else:
        table = Table(show_header=False, box=None)
        table.add_row("pod", f"{status.name} ({status.pod_id})")
        table.add_row("home", status.home)
        table.add_row("device", status.device_id)
        table.add_row("public key", status.public_key)
        table.add_row("schema", str(status.schema_version))
        table.add_row("store", f"{status.cipher['engine']}, {status.cipher['cipher']}")
        kdf = status.kdf
        table.add_row("key wrap", f"Argon2id t={kdf['time_cost']} m={kdf['memory_kib']} KiB "
                                  f"p={kdf['parallelism']}, AES-256-GCM")
        table.add_row("size", f"{status.database_bytes:,} bytes")
        for name, count in status.counts.items():
            table.add_row(name, str(count))
        verdict = ("[green]intact[/]" if chain["ok"] else
                   f"[red]BROKEN at entry {chain['bad_seq']}: {chain['reason']}[/]")
        table.add_row("audit chain", f"{verdict} ({chain['entries']} entries)")
        table.add_row("integrity", "[green]ok[/]" if not status.integrity else
                      f"[red]{len(status.integrity)} problems[/]")
        table.add_row("node key", f"{federation['node_key']} (the operator admits this file)")
        table.add_row("federation", f"joined {node['superlink']} (SuperNode pid {node['pid']})"
                      if node else "not joined")
        table.add_row("privacy budget", f"epsilon {used:.3g} of {policy.max_epsilon:g} spent "
                      f"(delta {policy.delta:g})")
        table.add_row("ledger", f"[green]intact[/] ({ledger_check.entries} entries, signed)"
                      if ledger_check.ok else f"[red]BROKEN: {ledger_check.reason}[/]")
        table.add_row("sync", f"user {sync['user_id']}, {sync['devices']} devices"
                      if sync["user_id"] else "not paired (`covey sync pair`)")
        table.add_row("context", ", ".join(context) or "no source on (`covey context enable`)")
        if stopped:
            table.add_row("stopped", "[red]yes[/] (`covey stop --release` to run again)")
        out.print(table)
    if status.integrity:
        raise StoreCorruptError(Path(status.home) / "pod.db",
                                f"{len(status.integrity)} integrity problems")
    if not chain["ok"]:
        typer.echo(f"error: audit log broken at entry {chain['bad_seq']}: {chain['reason']}",
                   err=True)
        raise typer.Exit(8)
    if not ledger_check.ok:
        typer.echo(f"error: privacy ledger broken: {ledger_check.reason}", err=True)
        raise typer.Exit(8)


@pod_app.command("export")
def pod_export(
    out_file: Annotated[Path, typer.Option("--out", help="Where to write the JSON export.")],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write everything the pod holds, decrypted, as JSON (your right of access)."""
    with open_pod(home) as pod, out.status("Exporting…"):
        size = pod.write_export(out_file)
    if as_json:
        _emit_json({"out": str(out_file.absolute()), "bytes": size})
    else:
        out.print(f"Exported {size:,} bytes to {out_file} [yellow](unencrypted: keep it safe)[/]")


@pod_app.command("forget")
def pod_forget(
    all_: Annotated[bool, typer.Option("--all", help="Erase the whole pod.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Crypto-shred the pod: destroy its wrapped data key and remove its files."""
    if not all_:
        raise InvalidInputError(
            "say --all to erase the whole pod (to erase one memory: covey memory forget ID)"
        )
    resolved = resolve_home(home)
    if not Pod.exists(resolved):
        raise PodNotFoundError(resolved)
    if not yes:
        if not sys.stdin.isatty():
            raise InvalidInputError("confirm with --yes when there is no terminal")
        typer.confirm(f"Erase the pod at {resolved} for good?", abort=True)
    removed = Pod.forget(resolved)
    if as_json:
        _emit_json({"home": str(resolved), "removed": removed})
    else:
        out.print(f"Erased the pod at {resolved}: data key destroyed, {len(removed)} files removed")


@pod_app.command("passwd")
def pod_passwd(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Change the passphrase (rewraps the data key; the store is not re-encrypted)."""
    resolved = home_for(home)
    if not Pod.exists(resolved):
        raise PodNotFoundError(resolved)
    old = passphrase("Current passphrase")
    new = passphrase("New passphrase", env="COVEY_NEW_PASSPHRASE", confirm=True)
    Pod.change_passphrase(resolved, old, new)
    if as_json:
        _emit_json({"home": str(resolved), "changed": True})
    else:
        out.print("Passphrase changed.")


@pod_app.command("consent")
def pod_consent(
    scope: Annotated[str, typer.Argument(help="What for, e.g. federated_training, or "
                                               "remote_generator[:HOST] to send prompts to "
                                               "a model server off this machine.")],
    grant: Annotated[bool, typer.Option("--grant/--revoke", help="Give or withdraw it.")],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Give or withdraw a consent (recorded in the audit log)."""
    from covey.device.assistant._egress import is_consent_scope
    from covey.device.assistant._feedback import set_consent

    if not is_consent_scope(scope):
        raise InvalidInputError("a consent scope is letters, digits and underscores "
                                "(or remote_generator:HOST)")
    scope = scope.lower() if scope.startswith("remote_generator:") else scope
    with open_pod(home) as pod:
        set_consent(pod, scope, grant)
    if as_json:
        _emit_json({"scope": scope, "granted": grant})
    else:
        out.print(f"{'Granted' if grant else 'Withdrew'} consent: {scope}")


@pod_app.command("join")
def pod_join(
    superlink: Annotated[str, typer.Option("--superlink", help="The aggregator, HOST:PORT.")],
    root_cert: Annotated[Path, typer.Option("--root-cert", help="The aggregator's CA "
                                            "certificate (ca.crt).")],
    aggregator_key: Annotated[Path | None, typer.Option(
        "--aggregator-key", help="The aggregator's model-signing key (signing.pub); "
        "default: next to the root certificate's folder.")] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Take part in federated training: start this pod's SuperNode (TLS, node key)."""
    from covey.device.federation._join import join

    resolved = home_for(home)
    if not Pod.exists(resolved):
        raise PodNotFoundError(resolved)
    from covey.device._stop import check_not_stopped

    check_not_stopped(resolved)
    info = join(resolved, passphrase(), superlink, root_cert, aggregator_key)
    if as_json:
        _emit_json(info)
    else:
        out.print(f"Joined {superlink}: SuperNode pid {info['pid']} (stop it with "
                  "`covey pod leave`)")


@pod_app.command("leave")
def pod_leave(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Stop this pod's SuperNode."""
    from covey.device.federation._join import leave

    stopped = leave(home_for(home))
    if as_json:
        _emit_json({"stopped": stopped})
    else:
        out.print("Stopped the SuperNode." if stopped else "No SuperNode was running.")


@pod_app.command("profile")
def pod_profile(
    name: Annotated[str | None, typer.Option(help="What the assistant calls you.")] = None,
    timezone: Annotated[str | None, typer.Option(help="An IANA time zone, e.g. "
                                                 "Europe/Lisbon.")] = None,
    language: Annotated[str | None, typer.Option(help="A language tag, e.g. pt-PT.")] = None,
    clear: Annotated[list[str] | None, typer.Option(help="Clear this field (repeatable).")
                     ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Your profile (name, time zone, language), shared with your paired devices."""
    from covey.device.memory._profile import get_profile, set_profile

    changes: dict[str, str | None] = {f: v for f, v in (
        ("name", name), ("timezone", timezone), ("language", language)) if v is not None}
    changes.update({f: None for f in clear or ()})
    with open_pod(home) as pod:
        profile = set_profile(pod, changes) if changes else get_profile(pod)
    if as_json:
        _emit_json(profile)
    else:
        out.print("\n".join(f"{k}: {v}" for k, v in profile.items()) or "No profile set.")


@pod_app.command("budget")
def pod_budget(
    max_epsilon: Annotated[float | None, typer.Option(
        "--max-epsilon", help="Set the most epsilon federated rounds may ever take.")] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The user's privacy budget: epsilon spent, the maximum, and every ledger entry."""
    from covey.device.federation._budget import pod_ledger, set_budget_policy

    with open_pod(home) as pod:
        if max_epsilon is not None:
            try:
                set_budget_policy(pod, max_epsilon)
            except ValueError as exc:
                raise InvalidInputError(str(exc)) from None
        ledger = pod_ledger(pod)
        policy, used = ledger.policy, ledger.spent()
        this = pod.identity.device_id
        rows = [{"device_id": e.device_id, "this_device": e.device_id == this, "seq": e.seq,
                 "created_at": e.created_at, "epsilon": e.epsilon, **{
                     k: v for k, v in asdict(e.release).items() if k not in ("peer",)}}
                for e in ledger.history()]
    result = {"epsilon_spent": used if used != float("inf") else None,
              "max_epsilon": policy.max_epsilon, "delta": policy.delta,
              "accountant": policy.accountant, "ledger": rows}
    if as_json:
        _emit_json(result)
        return
    out.print(f"epsilon spent {used:.4g} of {policy.max_epsilon:g} (delta {policy.delta:g}, "
              f"{policy.accountant} accountant over the whole ledger)")
    table = Table("run", "round", "kind", "mode", "z", "C", "q", "rounds charged",
                  "epsilon after", "device")
    for r in rows:
        table.add_row(r["run_id"], str(r["round"]), r["kind"], r["mode"],
                      f"{r['noise_multiplier']:.3g}", f"{r['clip_norm']:.3g}",
                      f"{r['sample_rate']:.3g}", str(r["rounds"]), f"{r['epsilon']:.4g}",
                      "this" if r["this_device"] else r["device_id"])
    out.print(table)


# -- covey memory -------------------------------------------------------------------


def _semantic(pod: Pod) -> None:
    from covey.device.assistant._chat import enable_semantic_memory

    enable_semantic_memory(pod, progress=lambda message: sys.stderr.write(message + "\n"))


def _memory_rows(rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title)
    table.add_column("id", justify="right")
    table.add_column("kind")
    table.add_column("text")
    table.add_column("created")
    for r in rows:
        table.add_row(str(r["id"]), r["kind"], r["text"], r["created_at"][:19])
    out.print(table)


@memory_app.command("add")
def memory_add(
    text: Annotated[str, typer.Argument(help="What to remember.")],
    kind: Annotated[str, typer.Option(help=f"One of {', '.join(MEMORY_KINDS)}.")] = "note",
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remember something."""
    with open_pod(home) as pod:
        _semantic(pod)
        memory = pod.memories.add(UserText(text), kind=kind)
    if as_json:
        _emit_json(memory.to_dict())
    else:
        out.print(f"Remembered #{memory.id} ({memory.kind})")


@memory_app.command("list")
def memory_list(
    kind: Annotated[str | None, typer.Option(help="Only this kind.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many.")] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List memories, newest first."""
    with open_pod(home) as pod:
        rows = [m.to_dict() for m in pod.memories.all(kind=kind, limit=limit)]
    if as_json:
        _emit_json(rows)
    else:
        _memory_rows(rows, f"{len(rows)} memories")


@memory_app.command("search")
def memory_search(
    query: Annotated[str, typer.Argument(help="Words to look for.")],
    limit: Annotated[int, typer.Option(min=1, help="At most this many.")] = 10,
    keyword: Annotated[bool, typer.Option("--keyword", help="Keywords only (no meaning).")
                       ] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Search memories by meaning and keywords (hybrid), best match first."""
    with open_pod(home) as pod:
        if keyword:
            hits = pod.memories.search(UserText(query), limit=limit)
        else:
            _semantic(pod)
            hits = pod.memories.recall(UserText(query), k=limit)
    rows = [{**h.memory.to_dict(), "score": round(h.score, 4)} for h in hits]
    if as_json:
        _emit_json(rows)
    else:
        _memory_rows(rows, f"{len(rows)} matches")


@memory_app.command("compact")
def memory_compact(
    max_messages: Annotated[int, typer.Option(min=1, help="History limit in messages.")
                            ] = 5000,
    keep_recent: Annotated[int, typer.Option(min=0, help="Newest messages kept as they are.")
                           ] = 500,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Merge duplicate memories; summarize and erase the oldest conversations."""
    from covey.device.store._compaction import compact

    if keep_recent > max_messages:
        raise InvalidInputError("--keep-recent cannot exceed --max-messages")
    with open_pod(home) as pod:
        _semantic(pod)
        report = compact(pod, max_messages=max_messages, keep_recent=keep_recent)
    if as_json:
        _emit_json(report.__dict__)
    else:
        out.print(f"merged {report.merged_memories} memories; summarized "
                  f"{report.summarized_conversations} conversations "
                  f"({report.erased_messages} messages erased)")


@memory_app.command("forget")
def memory_forget(
    memory_id: Annotated[int, typer.Argument(help="The id shown by `covey memory list`.")],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Erase one memory from the store, its search index and the file pages."""
    with open_pod(home) as pod:
        found = pod.memories.forget(memory_id)
    if not found:
        raise InvalidInputError(f"no memory #{memory_id}")
    if as_json:
        _emit_json({"id": memory_id, "forgotten": True})
    else:
        out.print(f"Forgot #{memory_id}")
