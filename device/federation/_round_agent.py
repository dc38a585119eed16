"""The round agent: the one process that holds a joined pod's data key.

``covey pod join`` unwraps the pod's data key with the passphrase and starts this
process (``python -m covey.device.federation._round_agent``), handing it the key down an inherited
pipe, its standard input: never an environment variable, a command-line argument or a
file. The agent then

1. marks itself non-dumpable (Linux ``PR_SET_DUMPABLE``), so other processes of the
   same user can read neither its memory nor its environment through /proc or ptrace;
2. listens on a Unix socket (``run/round.sock`` in the pod home: folder 0700, socket
   0600), answering only the SuperNode below and its processes (the ClientApp): each
   peer's process id, from ``SO_PEERCRED``, must descend from the SuperNode's;
3. starts the pod's Flower SuperNode as its child, with an environment cleared of
   covey's secrets, and lives exactly as long as that SuperNode.

covey's ClientApp, which the SuperNode runs for covey's signed app and nothing else
(``--trusted-entities``), holds no key: it forwards each message to this socket. The
agent passes it down a pipe to its worker (this module with ``--worker``, not dumpable
either, started with the key at the first message and ended after ``_IDLE`` seconds
without one, so torch and the model take memory during a run only). The worker opens
the pod for that message, answers with :func:`covey.device.federation._clientapp.answer` (consent,
the aggregator's signature on the model, the budget, training, the ledger and the audit
log) and closes it. What comes back is the reply alone: a clipped (and in local mode
noised) update, a noised histogram, or a refusal. The socket grants nothing else: not
the key, not a byte of the store.

Wire format: each side sends one frame, a 4-byte big-endian length then a Flower
``Message`` protobuf (the request, then the reply).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO

from covey._processes import child_env, flower_env

__all__ = ["MAX_FRAME", "ask", "recv_frame", "send_frame"]

MAX_FRAME = 64 * 2**20  # a round message is ~0.4 MB (adapter and signed version)
_READ_TIMEOUT = 30.0  # seconds a peer may take to send its request
# A worker outlives its message by this long, so the rounds of a run share torch and
# the model (as a Flower ClientApp process does); an idle pod then gives them back.
_IDLE = 60.0
_PR_SET_DUMPABLE = 4


def send_frame(sock: socket.socket, data: bytes) -> None:
    """Send one length-prefixed frame."""
    if len(data) > MAX_FRAME:
        raise ValueError(f"frame of {len(data)} bytes is over the {MAX_FRAME} limit")
    sock.sendall(struct.pack(">I", len(data)) + data)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the peer closed the connection mid-frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> bytes:
    """Receive one length-prefixed frame (raises ValueError when it is too large)."""
    (size,) = struct.unpack(">I", _read_exactly(sock, 4))
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes is over the {MAX_FRAME} limit")
    return _read_exactly(sock, size)


def ask(path: Path, request: bytes, timeout: float = 3600.0) -> bytes:
    """Send ``request`` to the round agent at ``path`` and return its reply.

    Raises:
        OSError: no agent listens there (the pod left, or was stopped).
        ValueError: a frame over the size limit.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        send_frame(sock, request)
        return recv_frame(sock)


# -- the agent process -------------------------------------------------------------------


def _no_dumps() -> None:
    """Keep other processes of this user out of this one's memory (Linux only)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def _listen(path: Path) -> socket.socket:
    """Bind the socket owner-only: in a 0700 folder, itself 0600."""
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(folder, 0o700)  # raises PermissionError for a folder not ours
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    listener.listen(8)
    return listener


def _parent(pid: int) -> int:
    """``pid``'s parent from /proc (0 once it is gone). The command name, in brackets,
    may hold spaces and brackets: the fields after the last ``)`` are fixed."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0
    return int(stat_line.rsplit(b")", 1)[1].split()[1])


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        pid = _parent(pid)
    return False


def _peer_allowed(conn: socket.socket, supernode: int) -> bool:
    """Whether the peer is the pod's SuperNode or one of its processes (the ClientApp it
    runs), of this user. Another process of the same user, which could not read the key,
    gets no update from the pod either (where /proc and SO_PEERCRED exist: elsewhere the
    0600 socket in its 0700 folder is the only check)."""
    if not hasattr(socket, "SO_PEERCRED") or not Path("/proc/self/stat").exists():
        return True
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    return uid == os.getuid() and _descends_from(pid, supernode)


class _Agent:
    """Answers round messages through a worker process it hands the key to."""

    def __init__(self, header: bytes) -> None:
        self._header = header  # the worker's settings, the data key among them
        self._worker: subprocess.Popen[bytes] | None = None
        self._used = 0.0
        self._lock = threading.Lock()

    def answer(self, request: bytes) -> bytes:
        """The worker's reply to one message (a new worker if there is none)."""
        with self._lock:
            worker = self._worker
            if worker is None or worker.poll() is not None:
                worker = self._worker = subprocess.Popen(
                    [sys.executable, "-m", "covey.device.federation._round_agent", "--worker"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env())
                self._send(worker, self._header)
            try:
                self._send(worker, request)
                reply = _read_frame(worker.stdout)  # type: ignore[arg-type]
            except (OSError, ValueError):
                self._retire()
                raise
            self._used = time.monotonic()
            return reply

    @staticmethod
    def _send(worker: subprocess.Popen[bytes], data: bytes) -> None:
        pipe = worker.stdin
        if pipe is None:
            raise OSError("the round worker has no input pipe")
        pipe.write(struct.pack(">I", len(data)) + data)
        pipe.flush()

    def retire_idle(self) -> None:
        """End the worker after ``_IDLE`` seconds without a message, for ever."""
        while True:
            time.sleep(_IDLE / 10)
            with self._lock:
                if self._worker is not None and time.monotonic() - self._used > _IDLE:
                    self._retire()

    def stop(self) -> None:
        """End the worker now, even mid-message."""
        worker = self._worker
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                worker.terminate()

    def _retire(self) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        with contextlib.suppress(OSError):
            if worker.stdin:
                worker.stdin.close()  # the worker ends at the end of its input
        try:
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()

    def serve(self, listener: socket.socket, supernode: int) -> None:
        """Answer one connection at a time, from the SuperNode's processes only, for as
        long as the process lives."""
        while True:
            conn, _ = listener.accept()
            with conn:
                try:
                    if not _peer_allowed(conn, supernode):
                        print("covey round agent: refused a process that is not the "
                              "pod's SuperNode's", file=sys.stderr, flush=True)
                        continue
                    conn.settimeout(_READ_TIMEOUT)
                    request = recv_frame(conn)
                    conn.settimeout(None)
                    send_frame(conn, self.answer(request))
                except Exception as exc:
                    # One bad peer must not end the agent. The type only is logged: a
                    # message could quote user data.
                    print(f"covey round agent: a request failed ({type(exc).__name__})",
                          file=sys.stderr, flush=True)


def _read_frame(stream: BinaryIO) -> bytes:
    head = stream.read(4)
    if len(head) != 4:
        raise ConnectionError("the round agent sent no frame")
    (size,) = struct.unpack(">I", head)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes is over the {MAX_FRAME} limit")
    data = stream.read(size)
    if len(data) != size:
        raise ConnectionError("the round agent's frame is cut short")
    return data


def worker() -> None:
    """Answer messages: settings, then messages, on stdin; replies on stdout. Ends at the
    end of its input."""
    _no_dumps()
    # Only replies go to the real stdout; anything a library prints goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    cfg = json.loads(_read_frame(sys.stdin.buffer))
    home, peer = Path(cfg["home"]), str(cfg["peer"])
    keys = base64.b64decode(cfg["data_key"]), base64.b64decode(cfg["device_key"])
    aggregator_key = base64.b64decode(cfg["aggregator_key"])
    while True:
        try:
            request = _read_frame(sys.stdin.buffer)
        except ConnectionError:
            return  # retired by the agent
        try:
            reply = _answer(request, home, keys, aggregator_key, peer)
        except Exception as exc:
            # The type only: a message could quote user data.
            print(f"covey round worker: failed ({type(exc).__name__})", file=sys.stderr,
                  flush=True)
            sys.exit(1)
        out.write(struct.pack(">I", len(reply)) + reply)
        out.flush()


def _answer(request: bytes, home: Path, keys: tuple[bytes, bytes], aggregator_key: bytes,
            peer: str) -> bytes:
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    from covey.device._pod import Pod
    from covey.device.federation._clientapp import answer

    proto = ProtoMessage()
    proto.ParseFromString(request)
    reply = answer(message_from_proto(proto), lambda: Pod.open_with_keys(home, *keys),
                   aggregator_key, peer)
    return bytes(message_to_proto(reply).SerializeToString())


def main() -> None:
    """Read the key and the SuperNode's command from stdin, listen, run the SuperNode."""
    _no_dumps()
    cfg = json.loads(sys.stdin.buffer.read())
    sys.stdin.close()
    home, socket_path = Path(cfg["home"]), Path(cfg["socket"])
    agent = _Agent(json.dumps({k: cfg[k] for k in ("home", "data_key", "device_key",
                                                   "aggregator_key", "peer")}).encode())
    listener = _listen(socket_path)
    node = subprocess.Popen(cfg["supernode"], stdin=subprocess.DEVNULL, cwd=home,
                            env=flower_env(Path(cfg["flwr_home"])))

    def stop(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            node.terminate()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threading.Thread(target=agent.serve, args=(listener, node.pid), name="covey-round-agent",
                     daemon=True).start()
    threading.Thread(target=agent.retire_idle, name="covey-round-idle", daemon=True).start()
    try:
        code = node.wait()
    finally:
        listener.close()
        socket_path.unlink(missing_ok=True)
        agent.stop()
    sys.exit(code)


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        worker()
    else:
        main()
