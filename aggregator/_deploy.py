"""Deployment on real Flower parts: certificates, the SuperLink, admitted pods, runs.

Everything the aggregator keeps lives in its home folder (``--home``)::

    certs/ca.crt ca.key server.pem server.key   the CA pods trust and the server's TLS
    registry/                                   signed model versions (see _registry)
    runs/RUN.json                               run records
    flwr/config.toml                            the flwr CLI's connection to our SuperLink
    state.db                                    the SuperLink's state
    logs/                                       process logs
    processes.json                              what covey started (pids), for stop
    metrics.json                                counters the metrics endpoint serves

Flower 1.42 serves Fleet, Control and the ServerApp runtime on one HTTPS port; with
``--enable-supernode-auth`` only SuperNodes whose public keys were registered with
``flwr supernode register`` may connect. The Control API has no authentication, and
what it accepts runs on the aggregator and may be sent to pods, so the SuperLink only
ever listens on the loopback: for another ``--host`` a Fleet-only gateway
(``_gateway``) listens there. Runs are of covey's app alone, signed with the registry's
key and handed to the SuperLink by ``_apphub``; pods run nothing else.

The loopback is still open to every account on the machine, and an app submitted there
runs as the operator, next to the registry's signing key: nothing within one machine's
accounts closes that (see the README). What can be closed is: the home is 0700 and
everything in it owner-only, the processes covey starts run with umask 077 (Flower's
``state.db`` holds the updates the SuperLink relays), the legacy gRPC Control and Fleet
APIs a SuperLink opens on 0.0.0.0 when told to by ``FLWR_INTERNAL_GRPC_*`` variables are
pinned to the loopback, and no inherited ``FLWR_*`` setting reaches a Flower process.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from covey._files import write_atomic
from covey._processes import (
    PRIVATE_UMASK,
    ProcessRef,
    child_env,
    flower_bin,
    flower_env,
    free_port,
    stop_tree,
)
from covey.errors import CoveyError, InvalidInputError

__all__ = ["AggregatorError", "AggregatorHome"]

FLOWER_APP = Path(__file__).with_name("flower_app")
CONNECTION = "covey"
DEFAULT_PORT = 9443


class AggregatorError(CoveyError):
    """The aggregator or its SuperLink cannot do what was asked."""

    exit_code = 9


def _name(cn: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_names_loopback(server_cert: Path) -> None:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(server_cert.read_bytes())
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        addresses = names.get_values_for_type(x509.IPAddress)
    except x509.ExtensionNotFound:
        addresses = []
    if ipaddress.ip_address("127.0.0.1") not in addresses:
        raise AggregatorError(f"{server_cert} does not name 127.0.0.1, where covey reaches "
                              "the SuperLink's Control API: make new certificates with "
                              "`covey aggregator certs --force --host ...`")


def _private_dir(path: Path) -> Path:
    """``path`` as an owner-only folder (made so, or tightened if it was not)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def _tighten(root: Path) -> None:
    """Take every group and other permission off ``root`` and what is under it (a home
    made by an older covey, or files a tool made with a looser umask)."""
    for folder, dirs, files in os.walk(root):
        for name in [folder, *(os.path.join(folder, n) for n in (*dirs, *files))]:
            mode = os.lstat(name).st_mode
            if mode & 0o077 and not os.path.islink(name):
                os.chmod(name, mode & 0o7700)


def _log_file(path: Path) -> int:
    """An owner-only log file, opened for appending (a descriptor the caller closes)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


class AggregatorHome:
    """The aggregator's folder and the processes it runs."""

    def __init__(self, path: Path) -> None:
        self.path = path.absolute()
        self.certs = self.path / "certs"
        self.flwr_home = self.path / "flwr"
        self.logs = self.path / "logs"
        self.runs = self.path / "runs"

    # -- certificates ------------------------------------------------------------------
    @property
    def root_cert(self) -> Path:
        """The CA certificate pods pass to ``covey pod join --root-cert``."""
        return self.certs / "ca.crt"

    def make_certs(self, hosts: list[str] | None = None, days: int = 365,
                   force: bool = False) -> Path:
        """Create a CA and a server certificate for ``hosts`` (default: the loopback)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        if self.root_cert.exists() and not force:
            raise InvalidInputError(f"certificates already exist in {self.certs} "
                                    "(--force replaces them; pods must then rejoin)")
        # covey reaches the SuperLink's Control API on the loopback whatever --host pods
        # use, so the certificate always names the loopback too.
        hosts = list(dict.fromkeys([*(hosts or []), "127.0.0.1", "localhost", "::1"]))
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca = (x509.CertificateBuilder().subject_name(_name("covey aggregator CA"))
              .issuer_name(_name("covey aggregator CA")).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=days))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(True, False, False, False, False, True, True,
                                           False, False), critical=True)
              .sign(ca_key, hashes.SHA256()))
        sans: list[x509.GeneralName] = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        key = ec.generate_private_key(ec.SECP384R1())
        cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage(
                    [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        pem = serialization.Encoding.PEM
        pkcs8 = serialization.PrivateFormat.PKCS8
        _private_dir(self.path)
        _private_dir(self.certs)
        write_atomic(self.certs / "ca.key",
                     ca_key.private_bytes(pem, pkcs8, serialization.NoEncryption()))
        write_atomic(self.certs / "server.key",
                     key.private_bytes(pem, pkcs8, serialization.NoEncryption()))
        # Public, but 0600 like everything here: the operator hands copies to pods.
        write_atomic(self.certs / "server.pem", cert.public_bytes(pem))
        write_atomic(self.root_cert, ca.public_bytes(pem))
        return self.root_cert

    # -- state files -------------------------------------------------------------------
    def registry(self) -> Any:
        """The model registry in this home."""
        from covey.aggregator._registry import Registry

        return Registry(self.path / "registry")

    def run_record(self, run_id: str) -> Path:
        """Where the record of run ``run_id`` is written."""
        _private_dir(self.runs)
        return self.runs / f"{run_id}.json"

    def _read(self, name: str, default: Any) -> Any:
        path = self.path / name
        if not path.exists():
            return default
        try:
            return json.loads(path.read_text())
        except ValueError:
            raise AggregatorError(f"{path} is corrupt (not JSON)") from None

    def _write(self, name: str, data: Any) -> None:
        write_atomic(self.path / name, (json.dumps(data, indent=2) + "\n").encode())

    @property
    def processes(self) -> dict[str, Any]:
        """What ``start`` launched and still runs: {"superlink": {"pid", "port",
        "process"}, "metrics": {...}}. A recorded pid that now names another process (the
        aggregator's stopped and the pid reused) does not count."""
        procs: dict[str, Any] = self._read("processes.json", {})
        running = {}
        for name, info in procs.items():
            ref = ProcessRef.parse(str(info.get("process", "")))
            if ref is not None and ref.current():
                running[name] = info
        return running

    def record_round(self, stats: dict[str, Any]) -> None:
        """Add a finished round to the counters the metrics endpoint serves."""
        m = self._read("metrics.json", {"rounds": 0, "participants": 0, "rejected": {},
                                         "refused": {}, "round_seconds": [], "epsilon": 0.0})
        m["rounds"] += 1
        m["participants"] += int(stats.get("accepted", 0))
        for key in ("rejected", "refused"):
            for reason, n in dict(stats.get(key, {})).items():
                m[key][reason] = m[key].get(reason, 0) + int(n)
        m["round_seconds"].append(float(stats.get("seconds", 0.0)))
        m["epsilon"] = stats.get("epsilon") or 0.0
        m["last_participants"] = int(stats.get("accepted", 0))
        self._write("metrics.json", m)

    def metrics(self) -> dict[str, Any]:
        """The counters (empty before the first round)."""
        return dict(self._read("metrics.json", {}))

    # -- the SuperLink -------------------------------------------------------------------
    @property
    def address(self) -> str:
        """host:port of the SuperLink."""
        cfg = self._read("aggregator.json", {})
        return f"{cfg.get('host', '127.0.0.1')}:{cfg.get('port', DEFAULT_PORT)}"

    def _flwr(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        result = subprocess.run([flower_bin("flwr"), *args, "--format", "json"],
                                capture_output=True, text=True, env=flower_env(self.flwr_home),
                                cwd=self.path, timeout=timeout, check=False,
                                umask=PRIVATE_UMASK)
        out = result.stdout
        try:
            data: dict[str, Any] = json.loads(out[out.index("{"):])
        except ValueError:
            text = re.sub(r"[\u2500-\u257f]|\bError\b", " ", result.stderr or out)
            raise AggregatorError(f"flwr {args[0]} failed: "
                                  f"{' '.join(text.split())[-300:]}") from None
        if not data.get("success", False):
            raise AggregatorError(f"flwr {args[0]} failed: "
                                  f"{data.get('error-message', data)}")
        return data

    def start(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
              metrics_port: int = 0, timeout: float = 60.0) -> dict[str, Any]:
        """Start the SuperLink (TLS, SuperNode authentication) on the loopback, the Fleet
        gateway when ``host`` is another address, and the metrics endpoint.

        Raises:
            AggregatorError: already running, no certificates, or a process failed.
        """
        if "superlink" in self.processes:
            raise AggregatorError(f"the aggregator in {self.path} is already running "
                                  f"(pid {self.processes['superlink']['pid']})")
        if not self.root_cert.exists():
            raise AggregatorError(f"no certificates in {self.certs}: "
                                  "run `covey aggregator certs` first")
        exposed = not _is_loopback(host)
        if exposed:
            _check_names_loopback(self.certs / "server.pem")
        _private_dir(self.path)
        _tighten(self.path)
        for d in (self.logs, self.flwr_home, self.runs):
            _private_dir(d)
        self.registry()  # creates the signing key on first start
        connect = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104
        control = f"127.0.0.1:{free_port()}" if exposed else f"{connect}:{port}"
        hub_port = free_port()
        self._write("aggregator.json", {"host": connect, "port": port, "control": control,
                                        "app_hub_port": hub_port})
        write_atomic(self.flwr_home / "config.toml", (
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{control}"\nroot-certificates = "{self.root_cert}"\n'
        ).encode())
        # The Hub API the SuperLink fetches named apps from is covey's, on the loopback.
        env = flower_env(self.flwr_home,
                         {"FLWR_SUPERGRID_API_URL": f"http://127.0.0.1:{hub_port}"})
        link_host, link_port = control.rsplit(":", 1)
        log = _log_file(self.logs / "superlink.log")
        try:
            link = subprocess.Popen(
                [flower_bin("flower-superlink"), "--ssl-ca-certfile", str(self.root_cert),
                 "--ssl-certfile", str(self.certs / "server.pem"),
                 "--ssl-keyfile", str(self.certs / "server.key"), "--enable-supernode-auth",
                 "--host", link_host if exposed else host, "--port", link_port,
                 "--database", str(self.path / "state.db"),
                 "--disable-runtime-dependency-installation",
                 # Flower's legacy gRPC Control and Fleet APIs start only when a
                 # FLWR_INTERNAL_GRPC_* variable says so (flower_env removes them), and
                 # then default to 0.0.0.0: should one start anyway, on the loopback.
                 "--control-api-address", f"127.0.0.1:{free_port()}",
                 "--fleet-api-address", f"127.0.0.1:{free_port()}"],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.path,
                start_new_session=True, umask=PRIVATE_UMASK)
        finally:
            os.close(log)
        procs: dict[str, Any] = {"superlink": {"pid": link.pid, "port": port,
                                               "process": str(ProcessRef.of(link.pid))}}
        self._write("processes.json", procs)
        self._wait_healthy(control, link, "SuperLink", timeout)
        if exposed:
            log = _log_file(self.logs / "gateway.log")
            try:
                gateway = subprocess.Popen(
                    [sys.executable, "-m", "covey.aggregator._gateway", host, str(port),
                     control, str(self.certs)], stdout=log, stderr=subprocess.STDOUT,
                    env=child_env(), start_new_session=True, umask=PRIVATE_UMASK)
            finally:
                os.close(log)
            procs["gateway"] = {"pid": gateway.pid, "port": port,
                                "process": str(ProcessRef.of(gateway.pid))}
            self._write("processes.json", procs)
            self._wait_healthy(f"{connect}:{port}", gateway, "Fleet gateway", timeout)
        metrics_port = metrics_port or free_port()
        log = _log_file(self.logs / "metrics.log")
        try:
            metrics = subprocess.Popen(
                [sys.executable, "-m", "covey.aggregator._metrics", str(self.path),
                 str(metrics_port)], stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                start_new_session=True, umask=PRIVATE_UMASK)
        finally:
            os.close(log)
        procs["metrics"] = {"pid": metrics.pid, "port": metrics_port,
                            "process": str(ProcessRef.of(metrics.pid))}
        self._write("processes.json", procs)
        return self.status()

    def _wait_healthy(self, address: str, process: subprocess.Popen[bytes], name: str,
                      timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        trust = ssl.create_default_context(cafile=str(self.root_cert))
        while True:
            if process.poll() is not None:
                self.stop()
                log = "superlink" if name == "SuperLink" else "gateway"
                tail = (self.logs / f"{log}.log").read_text(errors="replace")[-400:]
                raise AggregatorError(f"the {name} exited (code {process.returncode}): "
                                      f"{tail.strip().splitlines()[-1] if tail.strip() else ''}")
            try:
                if httpx.get(f"https://{address}/health", verify=trust, timeout=1.0).is_success:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AggregatorError(f"the {name} did not become healthy in {timeout:g} s")
            time.sleep(0.3)

    def stop(self) -> list[str]:
        """Stop every process ``start`` launched; returns their names."""
        stopped = []
        for name, info in self.processes.items():
            ref = ProcessRef.parse(str(info["process"]))
            if ref is not None:
                stop_tree(ref)  # only the process recorded, never a later one on its pid
            stopped.append(name)
        self._write("processes.json", {})
        return stopped

    def admit(self, public_key_file: Path, name: str | None = None) -> dict[str, Any]:
        """Register a pod's SuperNode public key so it may connect."""
        if "superlink" not in self.processes:
            raise AggregatorError("the aggregator is not running: `covey aggregator start`")
        try:
            text = public_key_file.read_text().strip()
        except OSError as exc:
            raise InvalidInputError(f"cannot read {public_key_file}: {exc.strerror}") from None
        if not text.startswith("ecdsa-sha2-nistp"):
            raise InvalidInputError(f"{public_key_file} is not a pod's node key "
                                    "(an OpenSSH ecdsa-sha2-nistp384 public key)")
        args = ["supernode", "register", str(public_key_file.absolute()), CONNECTION]
        if name:
            args += ["--name", name]
        data = self._flwr(*args)
        return {"node_id": data.get("node-id"), "key_file": str(public_key_file)}

    def admitted(self) -> list[dict[str, Any]]:
        """The registered SuperNodes and whether each is online."""
        if "superlink" not in self.processes:
            return []
        data = self._flwr("supernode", "list", CONNECTION)
        return list(data.get("nodes", data.get("supernodes", [])))

    def status(self) -> dict[str, Any]:
        """What `covey aggregator status --json` prints."""
        procs = self.processes
        registry = self.registry() if (self.path / "registry").exists() else None
        return {
            "home": str(self.path),
            "running": "superlink" in procs,
            "superlink": self.address,
            "root_cert": str(self.root_cert),
            "signing_key": str(registry.public_key_path) if registry else None,
            "metrics": (f"http://127.0.0.1:{procs['metrics']['port']}/metrics"
                        if "metrics" in procs else None),
            "pids": {k: v["pid"] for k, v in procs.items()},
            "admitted": self.admitted() if "superlink" in procs else [],
            "model_version": registry.current_id if registry else None,
            "runs": sorted(p.stem for p in self.runs.glob("*.json")) if self.runs.exists()
            else [],
        }

    # -- runs ----------------------------------------------------------------------------
    def submit(self, run_config: dict[str, Any]) -> str:
        """Start a run of covey's signed Flower app with ``run_config``; returns Flower's
        run id."""
        from covey.aggregator._apphub import AppHub

        if "superlink" not in self.processes:
            raise AggregatorError("the aggregator is not running: `covey aggregator start`")
        hub_port = int(self._read("aggregator.json", {}).get("app_hub_port", 0))
        if not hub_port:
            raise AggregatorError("this aggregator was started by an older covey: "
                                  "`covey aggregator stop`, then start it again")
        pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        with AppHub(self.registry(), hub_port) as hub:
            data = self._flwr("run", hub.spec, CONNECTION, "--run-config", pairs)
        return str(data["run-id"])

    def run_status(self, flower_run_id: str) -> tuple[str, str]:
        """Flower's status of a run and its details."""
        data = self._flwr("list", CONNECTION, "--run-id", flower_run_id)
        run = (data.get("runs") or [{}])[0]
        return str(run.get("status", "unknown")), str(run.get("status-details", ""))

    def train(self, run_config: dict[str, Any],
              on_round: Callable[[dict[str, Any]], None] | None = None,
              on_start: Callable[[str], None] | None = None, poll: float = 1.0
              ) -> dict[str, Any]:
        """Run covey's Flower app to the end; returns the run record.

        ``run_config`` must name the run (``run-name``); ``on_round`` sees each round's
        statistics as the ServerApp records them.

        Raises:
            AggregatorError: the run failed or was stopped (with Flower's reason).
        """
        run_name = str(run_config["run-name"])
        record_path = self.run_record(run_name)
        flower_id = self.submit({**run_config, "home": str(self.path)})
        if on_start:
            on_start(flower_id)
        shown = 0
        record: dict[str, Any] = {}
        while True:
            state, details = self.run_status(flower_id)
            if record_path.exists():
                record = json.loads(record_path.read_text())
            for stats in record.get("rounds", [])[shown:]:
                shown += 1
                if on_round:
                    on_round(stats)
            if state.startswith("finished"):
                break
            time.sleep(poll)
        if state != "finished:completed" or record.get("status") != "completed":
            raise AggregatorError(f"run {run_name} {state.removeprefix('finished:')}: "
                                  f"{details or 'see the aggregator logs'}")
        record["record_path"] = str(record_path)
        return record

    def stop_run(self, flower_run_id: str) -> None:
        """Ask the SuperLink to stop a run."""
        self._flwr("stop", flower_run_id, CONNECTION)
