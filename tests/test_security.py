"""Signed messages, TLS settings from the environment and YAML, and a private embedded store."""

from __future__ import annotations

import os
import ssl
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from machinery import Config, Server, Signature
from machinery.errors import ConfigError
from machinery.signing import HEADER, Signer
from machinery.tasks.signature import decode_signature
from machinery.testing import running_worker

# --- signing ---------------------------------------------------------------------------------


def test_a_signed_body_checks_out_and_any_changed_byte_does_not() -> None:
    signer = Signer("k1")
    sig = Signature("add", args=[1, 2], uuid="task_s", routing_key="q", headers={"traceparent": "x"})
    body = signer.sign(sig)
    assert sig.headers is not None and len(sig.headers[HEADER]) == 64
    assert signer.check(body, decode_signature(body)) is None
    tampered = body.replace(b'"Value":1', b'"Value":7')
    assert tampered != body
    assert "does not match" in (signer.check(tampered, decode_signature(tampered)) or "")
    assert "not signed" in (signer.check(b'{"Name":"add"}', decode_signature(b'{"Name":"add"}')) or "")
    assert "does not match" in (Signer("other").check(body, decode_signature(body)) or "")


def test_old_keys_are_accepted_during_a_rotation_but_never_used_to_sign() -> None:
    old_body = Signer("old").sign(Signature("add", args=[1], uuid="task_o"))
    rotating = Signer("new", ["old"])
    assert rotating.check(old_body, decode_signature(old_body)) is None
    new_body = rotating.sign(Signature("add", args=[1], uuid="task_o"))
    assert Signer("old").check(new_body, decode_signature(new_body)) is not None


@pytest.fixture
def signed(tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    """A producer and a worker with the same key on one embedded store, and a keyless producer."""
    url = f"sqlite:///{tmp_path / 'signed.sqlite3'}"
    worker_side = Server(Config(broker=url, result_backend=url, signing_key="s3cret"))
    worker_side.register_task("add", lambda x, y: x + y)
    keyless = Server(Config(broker=url, result_backend=url))
    try:
        yield worker_side, keyless
    finally:
        worker_side.close()
        keyless.close()


def test_workers_with_a_key_run_signed_tasks_and_dead_letter_the_rest(signed: tuple[Server, Server]) -> None:
    server, keyless = signed
    forged = keyless.send_task(Signature("add", args=[40, 2]))
    with running_worker(server):
        assert server.send_task(Signature("add", args=[1, 2])).get(timeout=15) == 3
        deadline = time.monotonic() + 15
        letters: list[tuple[bytes, str]] = []
        while not letters and time.monotonic() < deadline:
            letters = server.portal.run(server.get_broker().dead_letters())
            time.sleep(0.05)
    (body, reason), = letters
    assert decode_signature(body).uuid == forged.signature.uuid and "not signed" in reason


def test_retries_and_chain_links_sent_by_a_worker_are_signed_too(tmp_path: Path) -> None:
    from machinery import Chain

    url = f"sqlite:///{tmp_path / 'signed.sqlite3'}"
    server = Server(Config(broker=url, result_backend=url, signing_key="s3cret"))
    calls: list[int] = []

    @server.task
    def flaky(x: int) -> int:
        calls.append(x)
        if len(calls) == 1:
            raise RuntimeError("first try fails")
        return x

    @server.task
    def double(x: int) -> int:
        return 2 * x

    try:
        first = Signature("flaky", args=[21], retry_count=1)
        chain = server.send_chain(Chain(first, Signature("double")))
        with running_worker(server):
            assert chain.get(timeout=30) == 42
        assert server.portal.run(server.get_broker().dead_letters()) == []
    finally:
        server.close()


def test_signing_keys_come_from_the_environment_and_yaml(tmp_path: Path) -> None:
    cnf = Config.from_env({"SIGNING_KEY": "k", "SIGNING_KEYS_OLD": "a, b"})
    assert (cnf.signing_key, cnf.signing_keys_old) == ("k", ["a", "b"])
    path = tmp_path / "c.yml"
    path.write_text("signing_key: k2\nsigning_keys_old: [x]\n")
    cnf = Config.from_yaml(path)
    assert (cnf.signing_key, cnf.signing_keys_old) == ("k2", ["x"])


# --- TLS settings ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and its key, made with openssl."""
    folder = tmp_path_factory.mktemp("tls")
    crt, key = folder / "client.crt", folder / "client.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=machinery",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    return crt, key


def test_tls_from_the_environment_builds_a_verifying_context(cert: tuple[Path, Path]) -> None:
    crt, key = cert
    cnf = Config.from_env({"TLS_CA_FILE": str(crt), "TLS_CERT_FILE": str(crt), "TLS_KEY_FILE": str(key)})
    assert isinstance(cnf.tls, ssl.SSLContext)
    assert cnf.tls.verify_mode == ssl.CERT_REQUIRED and cnf.tls.check_hostname
    assert cnf.tls_settings.ca_file == str(crt)


def test_tls_from_yaml_and_verification_turned_off(cert: tuple[Path, Path], tmp_path: Path) -> None:
    crt, _ = cert
    path = tmp_path / "c.yml"
    path.write_text(f"tls:\n  ca_file: {crt}\n  verify: false\n")
    cnf = Config.from_yaml(path)
    assert isinstance(cnf.tls, ssl.SSLContext) and cnf.tls.verify_mode == ssl.CERT_NONE


def test_no_tls_settings_leave_the_drivers_defaults() -> None:
    assert Config().tls is None and Config.from_env({}).tls is None


@pytest.mark.parametrize(("env", "field"), [
    ({"TLS_CA_FILE": "/nonexistent/ca.pem"}, "tls.ca_file"),
    ({"TLS_CERT_FILE": "/nonexistent/c.pem"}, "tls.cert_file"),
    ({"TLS_KEY_FILE": "/k.pem"}, "tls.key_file"),
    ({"TLS_VERIFY": "maybe"}, "TLS_VERIFY"),
])
def test_bad_tls_settings_name_the_field(env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        Config.from_env(env)


# --- the embedded store's files --------------------------------------------------------------


def test_the_embedded_store_is_private_to_its_owner(tmp_path: Path) -> None:
    db = tmp_path / "private.sqlite3"
    old = os.umask(0o022)
    try:
        server = Server(Config(broker=f"sqlite:///{db}", result_backend=f"sqlite:///{db}"))
        server.register_task("add", lambda x, y: x + y)
        try:
            with running_worker(server):
                assert server.send_task(Signature("add", args=[1, 2])).get(timeout=15) == 3
        finally:
            server.close()
    finally:
        os.umask(old)
    files = [p for p in tmp_path.iterdir() if p.name.startswith("private.sqlite3") and p.is_file()]
    assert db in files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
