"""Coverage-guided fuzzing of the message and state decoders with atheris, for a fixed budget.

    .venv/bin/pip install atheris
    .venv/bin/python scripts/fuzz_decoder.py -max_total_time=300

Any input must decode or raise DecodeError; a decoded signature's arguments must convert or raise
a MachineryError. Anything else (a crash, another exception) stops the run with the input saved
as crash-*. The test command runs the hypothesis fuzzers (tests/test_fuzz.py); this one digs
deeper for as long as it is given. Starts from the Go golden vectors in tests/golden.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from machinery.errors import DecodeError, MachineryError
    from machinery.tasks.signature import decode_signature, encode_signature
    from machinery.tasks.state import decode_group_meta, decode_state


def one_input(data: bytes) -> None:
    try:
        sig = decode_signature(data)
    except DecodeError:
        pass
    else:
        try:
            sig.python_args()
            encode_signature(sig)
        except MachineryError:
            pass
    for decode in (decode_state, decode_group_meta):
        try:
            decode(data)
        except DecodeError:
            pass


def main() -> None:
    corpus = Path(tempfile.mkdtemp(prefix="machinery-fuzz-"))
    for golden in (Path(__file__).resolve().parent.parent / "tests" / "golden").glob("*.json"):
        (corpus / golden.name).write_bytes(golden.read_bytes())
    atheris.Setup([*sys.argv, str(corpus)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
