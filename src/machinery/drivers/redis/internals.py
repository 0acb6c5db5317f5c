"""Every use of redis-py's non-public parts, each with a fallback for releases that lack it.

They are here because measurements called for them or because redis-py offers no public way:
- the hiredis command packer (`HiredisRespSerializer`): packing a batch of tens of thousands of
  arguments in C instead of Python (the bulk-send and drain benchmarks); without it, redis-py's
  own packer writes the same bytes, slower;
- handing an `ssl.SSLContext` (Config.tls) to a connection as it is: redis-py takes only loose
  ssl_* options, which cannot carry a client certificate given as a context; without the hook,
  the options an SSLContext exposes are passed instead (CAs, verification, minimum version);
- whether a blocking connection has its socket, and the socket's own timeout: a wait that must
  end within its deadline reconnects within it (the send-and-wait latency runs); without them
  it connects as redis-py does.

tests/test_redis_connections.py runs each fallback with the internal taken away.
"""

from __future__ import annotations

import ssl
from typing import Any


def hiredis_serializer() -> Any:
    """redis-py's hiredis packer object, or None (no hiredis, or a release without the class)."""
    try:
        from redis.connection import HiredisRespSerializer
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError:
        return None
    serializer: Any = HiredisRespSerializer  # typed in some redis-py releases, not in others
    return serializer() if HIREDIS_AVAILABLE else None


def ssl_options(ctx: ssl.SSLContext | None) -> dict[str, Any]:
    """The ssl_* keyword options that carry what an SSLContext exposes (not a client certificate)."""
    if ctx is None:
        return {}
    cas = ctx.get_ca_certs(binary_form=True)
    reqs = {ssl.CERT_NONE: "none", ssl.CERT_OPTIONAL: "optional"}.get(ctx.verify_mode, "required")
    # by name: older releases take only the names (an enum there leaves the setting unset)
    out: dict[str, Any] = {"ssl_cert_reqs": reqs, "ssl_check_hostname": ctx.check_hostname,
                           "ssl_min_version": ctx.minimum_version}
    if cas:
        out["ssl_ca_data"] = "".join(ssl.DER_cert_to_PEM_cert(c) for c in cas)
    return out


def async_tls_class(ctx: ssl.SSLContext | None) -> tuple[type[Any], dict[str, Any]]:
    """The asyncio connection class for TLS that uses `ctx` as it is, and the extra connection
    options it needs: redis-py keeps its context in `ssl_context.context` (a RedisSSLContext);
    where a release keeps it elsewhere, the plain class with `ssl_options(ctx)`."""
    from redis.asyncio.connection import SSLConnection

    if ctx is None:
        return SSLConnection, {}
    if not async_context_hook():
        return SSLConnection, ssl_options(ctx)
    context = ctx

    class ContextSSLConnection(SSLConnection):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.ssl_context.context = context

    return ContextSSLConnection, {}


def blocking_tls_class(ctx: ssl.SSLContext | None) -> tuple[type[Any], dict[str, Any]]:
    """The blocking connection class for TLS that uses `ctx` as it is (by its socket-wrapping
    hook), and the extra options it needs; without that hook, the plain class with ssl_options."""
    from redis.connection import SSLConnection

    if ctx is None:
        return SSLConnection, {}
    if not blocking_wrap_hook():
        return SSLConnection, ssl_options(ctx)
    context = ctx

    class ContextSSLConnection(SSLConnection):
        def _wrap_socket_with_ssl(self, sock: Any) -> Any:
            return context.wrap_socket(sock, server_hostname=self.host)

    return ContextSSLConnection, {}


def async_context_hook() -> bool:
    """Whether the asyncio SSLConnection keeps its SSLContext where we can put ours."""
    from redis.asyncio.connection import RedisSSLContext

    return "context" in getattr(RedisSSLContext, "__slots__", ()) or hasattr(RedisSSLContext, "context")


def blocking_wrap_hook() -> bool:
    """Whether the blocking SSLConnection wraps its socket in a method we can override."""
    from redis.connection import SSLConnection

    return hasattr(SSLConnection, "_wrap_socket_with_ssl")


def is_connected(conn: Any) -> bool:
    """Whether a blocking connection has its socket (True where a release does not say: it then
    connects by itself on the next command, without our deadline)."""
    return getattr(conn, "_sock", True) is not None


def restore_socket_timeout(conn: Any, timeout: float | None) -> None:
    """Give a freshly made socket the connection's read timeout (it keeps the one it was made
    with); where the socket cannot be reached, the connection keeps redis-py's behaviour."""
    sock = getattr(conn, "_sock", None)
    if sock is not None:
        sock.settimeout(timeout)
