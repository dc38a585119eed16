"""Joining a federation: the pod's round agent and SuperNode, started and stopped by covey.

``covey pod join`` checks that the aggregator is reachable and that its certificate
verifies against the root certificate given, pins the aggregator's signing key in the
pod home (it signs model versions and covey's Flower app), unwraps the pod's data key
with the passphrase, and starts the pod's round agent (``_round_agent``) with that key
on its standard input. The agent starts a Flower SuperNode authenticated with the pod's
node key, whose ``--trusted-entities`` list only the pinned key: it runs covey's signed
app and refuses any other. No process covey starts has the passphrase or the key in its
environment. ``covey pod leave`` stops the agent and its SuperNode.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from covey._files import write_atomic
from covey._processes import ProcessRef, child_env, flower_bin, free_port, stop_tree
from covey.device._pod import Pod
from covey.errors import CoveyError, InvalidInputError
from covey.protocols import make_node_key, trusted_entities

__all__ = ["JoinError", "join", "leave", "node_key", "supernode"]

NODE_KEY = "node.key"
AGGREGATOR_KEY = "aggregator.pub"
TRUSTED_ENTITIES = "trusted-entities.yaml"
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
         aggregator_key: Path | None = None, wait: float = 60.0) -> dict[str, Any]:
    """Start this pod's round agent and SuperNode against ``superlink``; returns what
    was started (``wait``: the longest to wait for the aggregator to accept the node).

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
    key = _read_key(aggregator_key)
    data_key, device_key = Pod.keys(home, passphrase)
    with Pod.open_with_keys(home, data_key, device_key) as pod:
        _check_reachable(superlink, root_cert)
        public = node_key(home)
        shutil.copyfile(aggregator_key, home / AGGREGATOR_KEY)
        pinned_root = home / "aggregator-ca.crt"
        shutil.copyfile(root_cert, pinned_root)
        write_atomic(home / TRUSTED_ENTITIES, trusted_entities(key).encode())
        socket_path = _socket_path(home)
        node_config = f'round-socket="{socket_path}" superlink="{superlink}"'
        runtime_port = free_port()  # the SuperNode's own API, for its ClientApps
        supernode_command = [
            flower_bin("flower-supernode"), "--superlink", superlink,
            "--root-certificates", str(pinned_root),
            "--auth-supernode-private-key", str(home / NODE_KEY),
            "--trusted-entities", str(home / TRUSTED_ENTITIES),
            "--node-config", node_config, "--host", "127.0.0.1", "--port", str(runtime_port)]
        log_path = home / "logs" / "supernode.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        started = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "covey.device.federation._round_agent", str(home)],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                cwd=home, start_new_session=True)
        # The key goes down the pipe, never into an environment, argument or file.
        pipe = process.stdin  # Popen(stdin=PIPE) always makes one
        if pipe is not None:
            with contextlib.suppress(BrokenPipeError), pipe:
                pipe.write(json.dumps({
                    "home": str(home), "data_key": base64.b64encode(data_key).decode(),
                    "device_key": base64.b64encode(device_key).decode(),
                    "aggregator_key": base64.b64encode(key).decode(), "peer": superlink,
                    "socket": str(socket_path), "flwr_home": str(home / "flwr"),
                    "supernode": supernode_command}).encode())
        _wait_accepted(process, log_path, started, wait)
        if process.poll() is not None:
            text = log_path.read_bytes()[started:].decode(errors="replace")
            if "2004" in text or "2001" in text or "registered" in text:
                raise JoinError(f"the aggregator refused this pod: its node key is not admitted "
                                f"(the operator runs `covey aggregator admit {public}`)")
            raise JoinError(f"the SuperNode exited with code {process.returncode}; "
                            f"see {log_path}")
        info = {"pid": process.pid, "process": str(ProcessRef.of(process.pid)),
                "superlink": superlink, "port": runtime_port, "node_key": str(public),
                "log": str(log_path), "socket": str(socket_path)}
        write_atomic(home / SUPERNODE, json.dumps(info).encode())
        pod.audit("federation_join", peer=superlink, detail={"node_key": public.name})
    return info


def _wait_accepted(process: subprocess.Popen[bytes], log_path: Path, start: int,
                   wait: float) -> None:
    """Return once the SuperNode is registered (it logs its id), has exited (refused),
    or ``wait`` seconds have passed (still connecting: taken as accepted)."""
    deadline = time.monotonic() + wait
    while process.poll() is None and time.monotonic() < deadline:
        with open(log_path, "rb") as log:
            log.seek(start)
            if b"SuperNode ID:" in log.read():
                return
        time.sleep(0.1)


def _socket_path(home: Path) -> Path:
    """Where the round agent listens: in the pod home when the path fits a socket
    address (108 bytes), else in a fresh private folder (0700) in the temporary one."""
    path = home / "run" / "round.sock"
    if len(str(path).encode()) < 100:
        return path
    return Path(tempfile.mkdtemp(prefix="pod-round-")) / "round.sock"


def leave(home: Path) -> bool:
    """Stop this pod's round agent and SuperNode; False when none was running."""
    info = supernode(home)
    (home / SUPERNODE).unlink(missing_ok=True)
    if info is None:
        return False
    ref = ProcessRef.parse(str(info["process"]))
    if ref is not None:
        stop_tree(ref)
    socket_path = Path(str(info.get("socket", home / "run" / "round.sock")))
    socket_path.unlink(missing_ok=True)
    if socket_path.parent.name.startswith("pod-round-"):
        with contextlib.suppress(OSError):
            socket_path.parent.rmdir()
    return True
