import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from naming import SESSION_PREFIX  # every RabbitMQ queue and exchange this session creates starts with it

#: the fault suite's count lines of this session, shown in the terminal summary
FAULT_COUNTS = pytest.StashKey[list[str]]()


@pytest.fixture
def fault_report(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Add a line to the session's fault-suite counts (shown at the end of the run, without -s)."""
    return request.config.stash.setdefault(FAULT_COUNTS, []).append


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    lines = config.stash.get(FAULT_COUNTS, [])
    if lines:
        terminalreporter.section("fault suite")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session: object, exitstatus: int) -> None:
    """Delete the RabbitMQ queues and exchanges this session's tests left on the shared server."""
    import asyncio
    import shutil
    import subprocess

    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        return

    def names(kind: str) -> list[str]:
        try:
            out = subprocess.run([ctl, "-q", kind, "name"], check=False, capture_output=True, text=True,
                                 timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [line.strip() for line in out.splitlines() if line.strip().startswith(SESSION_PREFIX)]

    queues, exchanges = names("list_queues"), names("list_exchanges")
    if not queues and not exchanges:
        return

    async def purge() -> None:
        import aiormq

        from amqp_support import AMQP_URL

        conn = await aiormq.connect(AMQP_URL)
        channel = await conn.channel()
        for queue in queues:
            await channel.queue_delete(queue)
        for exchange in exchanges:
            await channel.exchange_delete(exchange)
        await conn.close()

    try:
        asyncio.run(asyncio.wait_for(purge(), 120))
    except Exception as exc:  # cleanup must never fail the run
        print(f"\nleft {len(queues)} test queues on RabbitMQ: {exc}")


def pytest_unconfigure(config: object) -> None:
    """Remove the SQLite doorbell sockets that processes killed by the tests left in the temp dir
    (a bell is named after its owner's pid in hex; the live ones are kept)."""
    import glob
    import os
    import tempfile

    for bell in glob.glob(os.path.join(tempfile.gettempdir(), "machinery-bells-*", "*", "*.bell")):
        try:
            pid = int(os.path.basename(bell).split("-", 1)[0], 16)
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(bell)
        except (ValueError, OSError):
            continue
    for kind_dir in glob.glob(os.path.join(tempfile.gettempdir(), "machinery-bells-*", "*")):
        with contextlib.suppress(OSError):
            os.rmdir(kind_dir)  # only when empty
            os.rmdir(os.path.dirname(kind_dir))
