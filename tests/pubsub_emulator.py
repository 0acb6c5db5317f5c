"""One Google Pub/Sub emulator per test run, shared by every test that needs it.

`emulator_host()` starts `cloud-pubsub-emulator` (Debian package google-cloud-cli-pubsub-emulator,
a Java program) on a free 127.0.0.1 port the first time it is called, sets PUBSUB_EMULATOR_HOST for
this process (the Pub/Sub clients and the broker read it), and stops the emulator when the test
process exits. MACHINERY_TEST_PUBSUB_EMULATOR=HOST:PORT uses a running emulator instead. Tests keep
apart by naming their topics and subscriptions uniquely. A missing emulator skips locally and fails
with CI=true.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from servers import free_port, unavailable

PROJECT = "machinery-test"
_LAUNCHER = "platform/pubsub-emulator/bin/cloud-pubsub-emulator"
_SDK_ROOTS = ("/usr/lib/google-cloud-sdk", "/usr/share/google-cloud-sdk", "/opt/google-cloud-sdk")

_lock = threading.Lock()
_host: list[str] = []



def find_launcher() -> str | None:
    """The emulator's launcher script: from dpkg, the usual SDK folders, or next to `gcloud`."""
    try:
        listed = subprocess.run(["dpkg", "-L", "google-cloud-cli-pubsub-emulator"], capture_output=True,
                                text=True, timeout=10, check=False).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        listed = []
    candidates = [p for p in listed if p.endswith("bin/cloud-pubsub-emulator")]
    roots = list(_SDK_ROOTS)
    gcloud = shutil.which("gcloud")
    if gcloud:
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(gcloud))))
    candidates += [os.path.join(root, _LAUNCHER) for root in roots]
    candidates += glob.glob(f"/root/google-cloud-sdk/{_LAUNCHER}")
    return next((p for p in candidates if os.access(p, os.X_OK)), None)



def _wait_up(port: int, proc: subprocess.Popen[bytes], log: str, deadline_s: float = 60.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Pub/Sub emulator exited with code {proc.returncode}: {_tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the Pub/Sub emulator did not listen on {port} in {deadline_s} s: {_tail(log)}")


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-2000:]
    except OSError:
        return ""


def emulator_host() -> str:
    """HOST:PORT of this run's emulator, started on first use; PUBSUB_EMULATOR_HOST points at it."""
    with _lock:
        if not _host:
            given = os.environ.get("MACHINERY_TEST_PUBSUB_EMULATOR", "")
            _host.append(given or _start())
        os.environ["PUBSUB_EMULATOR_HOST"] = _host[0]
        return _host[0]


def _start() -> str:
    launcher = find_launcher()
    if launcher is None:
        unavailable("Google's Pub/Sub emulator is not installed (Debian package google-cloud-cli-pubsub-emulator)")
        raise AssertionError("unreachable")
    if shutil.which("java") is None:
        unavailable("the Pub/Sub emulator needs Java, which is not installed")
    port = free_port()
    data = tempfile.mkdtemp(prefix="machinery-pubsub-")
    log = os.path.join(data, "emulator.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen([launcher, "--host=127.0.0.1", f"--port={port}"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(data, ignore_errors=True)

    atexit.register(stop)
    try:
        _wait_up(port, proc, log)
    except RuntimeError as exc:
        stop()
        unavailable(str(exc))
    return f"127.0.0.1:{port}"


@contextlib.contextmanager
def raw_clients(host: str) -> Iterator[tuple[Any, Any]]:
    """Synchronous (publisher, subscriber) clients of the emulator, to look behind the broker's back."""
    import grpc
    from google.pubsub_v1 import PublisherClient, SubscriberClient
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

    channel = grpc.insecure_channel(host)
    try:
        yield (PublisherClient(transport=PublisherGrpcTransport(channel=channel)),
               SubscriberClient(transport=SubscriberGrpcTransport(channel=channel)))
    finally:
        channel.close()


def delete_resources(host: str, project: str, marker: str) -> None:
    """Delete the emulator's topics and subscriptions whose names contain `marker`."""
    with raw_clients(host) as (pub, sub):
        for s in sub.list_subscriptions(project=f"projects/{project}"):
            if marker in s.name:
                sub.delete_subscription(subscription=s.name)
        for t in pub.list_topics(project=f"projects/{project}"):
            if marker in t.name:
                pub.delete_topic(topic=t.name)


@pytest.fixture(scope="session")
def pubsub_emulator() -> str:
    """The shared emulator's HOST:PORT (a fixture form of emulator_host())."""
    return emulator_host()
