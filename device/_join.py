"""Joining a federation: the pod's SuperNode, started and stopped by covey.

``covey pod join`` checks that the aggregator is reachable and that its certificate
verifies against the root certificate given, pins the aggregator's model-signing key in
the pod home, and starts a Flower SuperNode authenticated with the pod's node key. The
SuperNode runs covey's ClientApp, which opens the pod with the passphrase from its
environment for each round. ``covey pod leave`` stops it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

from covey._files import write_atomic
from covey._processes import ProcessRef, flower_bin, flower_env, free_port, stop_tree
from covey.device._pod import Pod
from covey.errors import CoveyError, InvalidInputError
from covey.protocols import make_node_key

__all__ = ["JoinError", "join", "leave", "node_key", "supernode"]

NODE_KEY = "node.key"
AGGREGATOR_KEY = "aggregator.pub"
SUPERNODE = "supernode.json"


class JoinError(CoveyError):
    """The pod could not join the federation."""

    exit_code = 9


def node_key(home: Path) -> Path:
    """The public key file the operator admits (created on first use)."""
    public = home / f"{NODE_KEY}.pub"
    if not public.exists():
        make_node_key(home / NODE_KEY)
    return public


def supernode(home: Path) -> dict[str, Any] | None:
    """The running SuperNode of this pod, if any."""
    path = home / SUPERNODE
    if not path.exists():
        return None
    try:
        info: dict[str, Any] = json.loads(path.read_text())
    except ValueError:
        return None
    # The recorded process, not whatever now holds its pid.
    ref = ProcessRef.parse(str(info.get("process", "")))
    return info if ref is not None and ref.current() else None


def _check_reachable(superlink: str, root_cert: Path) -> None:
    import httpx

    try:
        trust = ssl.create_default_context(cafile=str(root_cert))
        response = httpx.get(f"https://{superlink}/health", verify=trust, timeout=5.0)
    except httpx.ConnectError as exc:
        if "expired" in str(exc).lower():
            raise JoinError(f"the aggregator's certificate at {superlink} has expired "
                            "(the operator renews it with `covey aggregator certs --force`)"
                            ) from None
        if isinstance(exc.__cause__, ssl.SSLError) or "CERTIFICATE" in str(exc).upper():
            raise JoinError(f"the aggregator's certificate at {superlink} does not verify "
                            f"against {root_cert} (wrong root certificate, or expired)"
                            ) from None
        raise JoinError(f"cannot reach the aggregator at {superlink}: connection refused or "
                        "no route") from None
    except httpx.HTTPError as exc:
        raise JoinError(f"cannot reach the aggregator at {superlink}: {type(exc).__name__}"
                        ) from None
    if not response.is_success:
        raise JoinError(f"the aggregator at {superlink} is not healthy "
                        f"(HTTP {response.status_code})")


def _read_key(path: Path) -> bytes:
    try:
        key = base64.b64decode(path.read_text().strip(), validate=True)
    except (OSError, ValueError, binascii.Error):
        raise InvalidInputError(f"{path} is not an aggregator signing key") from None
    if len(key) != 32:
        raise InvalidInputError(f"{path} is not an aggregator signing key (not 32 bytes)")
    return key


def join(home: Path, passphrase: str, superlink: str, root_cert: Path,
         aggregator_key: Path | None = None, wait: float = 4.0) -> dict[str, Any]:
    """Start this pod's SuperNode against ``superlink``; returns what was started.

    Raises:
        InvalidInputError: a file is missing or not what it should be.
        JoinError: unreachable aggregator, bad certificate, or this pod not admitted.
        WrongPassphraseError: the passphrase does not open the pod.
    """
    home, root_cert = home.absolute(), root_cert.absolute()
    running = supernode(home)
    if running:
        raise JoinError(f"this pod already runs a SuperNode (pid {running['pid']}); "
                        "`covey pod leave` first")
    if not root_cert.is_file():
        raise InvalidInputError(f"root certificate {root_cert} does not exist")
    if aggregator_key is None:
        guess = root_cert.resolve().parent.parent / "registry" / "signing.pub"
        if not guess.exists():
            raise InvalidInputError("pass --aggregator-key FILE: the aggregator's signing.pub "
                                    "(`covey aggregator status` shows where it is)")
        aggregator_key = guess
    _read_key(aggregator_key)
    with Pod.open(home, passphrase) as pod:  # the passphrase must open the pod
        _check_reachable(superlink, root_cert)
        public = node_key(home)
        shutil.copyfile(aggregator_key, home / AGGREGATOR_KEY)
        pinned_root = home / "aggregator-ca.crt"
        shutil.copyfile(root_cert, pinned_root)
        port = free_port()
        node_config = (f'pod-home="{home}" aggregator-key="{home / AGGREGATOR_KEY}" '
                       f'superlink="{superlink}"')
        env = flower_env(home / "flwr", {"COVEY_PASSPHRASE": passphrase})
        log_path = home / "logs" / "supernode.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        started = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [flower_bin("flower-supernode"), "--superlink", superlink,
                 "--root-certificates", str(pinned_root),
                 "--auth-supernode-private-key", str(home / NODE_KEY),
                 "--node-config", node_config, "--host", "127.0.0.1", "--port", str(port)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=home,
                start_new_session=True)
        # A refused node exits within about two seconds; one still running after
        # ``wait`` seconds has been accepted.
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait)
        if process.poll() is not None:
            text = log_path.read_bytes()[started:].decode(errors="replace")
            if "2004" in text or "2001" in text or "registered" in text:
                raise JoinError(f"the aggregator refused this pod: its node key is not admitted "
                                f"(the operator runs `covey aggregator admit {public}`)")
            raise JoinError(f"the SuperNode exited with code {process.returncode}; "
                            f"see {log_path}")
        info = {"pid": process.pid, "process": str(ProcessRef.of(process.pid)),
                "superlink": superlink, "port": port,
                "node_key": str(public), "log": str(log_path)}
        write_atomic(home / SUPERNODE, json.dumps(info).encode())
        pod.audit("federation_join", peer=superlink, detail={"node_key": public.name})
    return info


def leave(home: Path) -> bool:
    """Stop this pod's SuperNode; False when none was running."""
    info = supernode(home)
    (home / SUPERNODE).unlink(missing_ok=True)
    if info is None:
        return False
    ref = ProcessRef.parse(str(info["process"]))
    if ref is not None:
        stop_tree(ref)
    return True
