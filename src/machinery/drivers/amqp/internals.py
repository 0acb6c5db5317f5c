"""aiormq's non-public parts that the AMQP drivers use, with a fallback where a release lacks them.

RabbitMQ answers a handshake it refuses (a missing virtual host, one the user may not use) with
Connection.Close and a reply text; aiormq 7 reports that as an InvalidFrameError that has lost the
text, so the one clear line per retry could not say why. The override of aiormq's `_rpc` (the
handshake's request-reply step) keeps it. Without that method (another aiormq release), the
plain connection is used: the error says less, nothing else changes.
tests/test_amqp_connection_errors.py runs the fallback with the method taken away.
"""

from __future__ import annotations

import asyncio

import aiormq
import pamqp.frame
from aiormq import exceptions as amqp_exc
from aiormq.connection import FrameReceiver
from pamqp import commands as spec
from pamqp.base import Frame
from pamqp.frame import FrameTypes


class HandshakeRefused(ConnectionError):
    """RabbitMQ closed the connection during the handshake, with its reply code and text."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


class _RefusalKeepingConnection(aiormq.Connection):
    """aiormq's connection, keeping the server's reason when it closes the handshake: aiormq 7
    reports a Connection.Close received instead of Connection.OpenOk (a missing virtual host, or
    one the user may not use) as an InvalidFrameError that has lost the reply text."""

    @staticmethod
    async def _rpc(request: Frame, writer: asyncio.StreamWriter, frame_receiver: FrameReceiver,
                   wait_response: bool = True) -> FrameTypes | None:
        writer.write(pamqp.frame.marshal(request, 0))
        await writer.drain()
        if not wait_response:
            return None
        _, _, frame = await frame_receiver.get_frame()
        if isinstance(frame, spec.Connection.Close):
            if frame.reply_code == 403:
                raise amqp_exc.ProbableAuthenticationError(frame.reply_text)
            raise HandshakeRefused(frame.reply_code or 0, frame.reply_text or "")
        if request.synchronous and frame.name not in request.valid_responses:
            raise amqp_exc.InvalidFrameError(f"Expected one of {request.valid_responses!r}, got {frame!r}")
        return frame




def connection_class() -> type[aiormq.Connection]:
    """The connection class to dial with: the one that keeps a refusal's reason, where this
    aiormq release has the step it overrides."""
    if callable(getattr(aiormq.Connection, "_rpc", None)):
        return _RefusalKeepingConnection
    return aiormq.Connection
