"""Joining a federation: what the pod says about an aggregator it cannot trust or reach."""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from covey._processes import free_port
from covey.device.federation._join import JoinError, _check_reachable, join
from covey.errors import InvalidInputError, WrongPassphraseError
from tests.conftest import PASSPHRASE


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _certs(folder: Path, expired: bool) -> tuple[Path, Path, Path]:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("ca")).issuer_name(_name("ca"))
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - datetime.timedelta(days=30))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    end = now - datetime.timedelta(days=1) if expired else now + datetime.timedelta(days=1)
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(days=10)).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = folder / "ca.crt", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _serve(cert: Path, key: Path) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.fixture
def valid(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    ca, cert, key = _certs(tmp_path, expired=False)
    for address in _serve(cert, key):
        yield address, ca


@pytest.fixture
def expired(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    ca, cert, key = _certs(tmp_path, expired=True)
    for address in _serve(cert, key):
        yield address, ca


def test_a_healthy_aggregator_passes(valid: tuple[str, Path]) -> None:
    _check_reachable(*valid)


def test_an_expired_certificate_is_named(expired: tuple[str, Path]) -> None:
    with pytest.raises(JoinError, match="has expired"):
        _check_reachable(*expired)


def test_a_wrong_root_and_no_server(valid: tuple[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    other_ca, _, _ = _certs(other, expired=False)
    with pytest.raises(JoinError, match="does not verify"):
        _check_reachable(valid[0], other_ca)
    with pytest.raises(JoinError, match="cannot reach"):
        _check_reachable(f"127.0.0.1:{free_port()}", valid[1])


def test_join_checks_its_inputs_before_starting_anything(pod: object, home: Path,
                                                          valid: tuple[str, Path],
                                                          tmp_path: Path) -> None:
    address, ca = valid
    with pytest.raises(InvalidInputError, match="does not exist"):
        join(home, PASSPHRASE, address, tmp_path / "missing.crt", tmp_path / "k.pub")
    with pytest.raises(InvalidInputError, match="--aggregator-key"):
        join(home, PASSPHRASE, address, ca)
    bad_key = tmp_path / "signing.pub"
    bad_key.write_text("not a key\n")
    with pytest.raises(InvalidInputError, match="not an aggregator signing key"):
        join(home, PASSPHRASE, address, ca, bad_key)
    good_key = tmp_path / "good.pub"
    good_key.write_text("QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=\n")  # 32 bytes
    with pytest.raises(WrongPassphraseError):
        join(home, "wrong passphrase!", address, ca, good_key)
    assert not (home / "supernode.json").exists()
