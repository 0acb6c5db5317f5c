"""HMAC signatures on messages (`Config.signing_key`), so that a worker runs only what a holder of
the key sent.

The signature is HMAC-SHA256 over the message body as sent, with the signature's own 64 hex
digits replaced by zeros, carried in the message's Headers under `machinery-signature` (Go
Machinery ignores it, so Go workers still run signed messages; Go producers cannot sign). Signing
the bytes themselves needs no canonical re-encoding: any change to any byte fails the check.

What it protects: a worker with a key runs no message that was forged or altered by someone who
can write to the broker but does not hold the key. What it does not: a signed message can be
replayed (sent again as is) while it is valid; anyone who can read the broker sees the arguments
(signing is not encryption); and a Go worker, which does not check, runs anything.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from machinery.tasks.signature import Signature, encode_signature

HEADER = "machinery-signature"
_BLANK = "0" * 64
_KEY = b'"' + HEADER.encode() + b'":"'


class Signer:
    """Signs with one key and accepts that key and the old ones (during a rotation)."""

    def __init__(self, key: str, old_keys: Sequence[str] = ()) -> None:
        self._key = key.encode()
        self._accepted = [self._key, *(k.encode() for k in old_keys if k)]

    def sign(self, sig: Signature) -> bytes:
        """The signed body of `sig` (its Headers get the signature too)."""
        headers = sig.headers if sig.headers is not None else {}
        headers[HEADER] = _BLANK
        sig.headers = headers
        body = encode_signature(sig)
        digest = hmac.new(self._key, body, hashlib.sha256).hexdigest()
        headers[HEADER] = digest
        return body.replace(_KEY + _BLANK.encode() + b'"', _KEY + digest.encode() + b'"', 1)

    def check(self, body: bytes, sig: Signature) -> str | None:
        """Why `body` (decoded as `sig`) is not to be run, or None when a known key signed it."""
        claimed = (sig.headers or {}).get(HEADER)
        if not isinstance(claimed, str) or len(claimed) != 64:
            return "message is not signed (Config.signing_key requires a signature)"
        token = _KEY + claimed.encode() + b'"'
        if token not in body:
            return "message signature is malformed"
        blank = body.replace(token, _KEY + _BLANK.encode() + b'"', 1)
        for key in self._accepted:
            if hmac.compare_digest(hmac.new(key, blank, hashlib.sha256).hexdigest(), claimed):
                return None
        return "message signature does not match (altered, or signed with an unknown key)"
