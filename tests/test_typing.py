"""The typed user boundary, as mypy sees it: tests/typing/*.py carry, on each line, the notes
(`# N:`, reveal_type) and errors (`# E:`) mypy --strict must report there, and nothing else."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import machinery

pytest.importorskip("mypy")

SAMPLES = sorted((Path(__file__).parent / "typing").glob("*.py"))
_MARK = re.compile(r"#\s*([NE]):\s*(.*?)\s*(?=#\s*[NE]:|$)")
_REPORT = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): (?P<kind>error|note): (?P<text>.*)$")


def expected(path: Path) -> set[tuple[int, str, str]]:
    out = set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        code, sep, comment = line.partition("  # ")
        if not sep or not code.strip():
            continue
        for kind, text in _MARK.findall("# " + comment):
            out.add((number, "error" if kind == "E" else "note", text))
    return out


def reported(output: str, path: Path) -> set[tuple[int, str, str]]:
    out = set()
    for line in output.splitlines():
        m = _REPORT.match(line)
        if m is None or Path(m["file"]).name != path.name:
            continue
        kind, text = m["kind"], m["text"]
        if kind == "note" and not text.startswith("Revealed type is"):
            continue  # hints that follow an error ("defined here", "did you mean")
        out.add((int(m["line"]), kind, text))
    return out


@pytest.mark.parametrize("sample", SAMPLES, ids=[p.name for p in SAMPLES])
def test_mypy_reports_exactly_what_the_sample_expects(sample: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    src = Path(machinery.__file__).resolve().parents[1]  # the sources under test, not an installed copy
    monkeypatch.setenv("MYPYPATH", str(src))
    want = expected(sample)
    assert any(kind == "error" for _, kind, _ in want) and any(kind == "note" for _, kind, _ in want)
    # in a process of its own: mypy raises the interpreter's recursion limit for good
    run = subprocess.run([
        sys.executable, "-m", "mypy",
        "--strict", "--config-file=", "--python-version=3.11", "--no-error-summary", "--hide-error-context",
        "--no-pretty", "--show-error-codes", "--no-color-output", f"--cache-dir={tmp_path / 'cache'}",
        str(sample),
    ], capture_output=True, text=True, timeout=300, check=False)
    stdout, stderr, status = run.stdout, run.stderr, run.returncode
    assert status == 1 and not stderr, stdout + stderr
    got = reported(stdout, sample)
    missing = sorted(want - got)
    unexpected = sorted(got - want)
    assert not missing and not unexpected, (
        "mypy differs from the sample's comments\nexpected, not reported:\n"
        + "\n".join(f"  {n}: {k}: {t}" for n, k, t in missing)
        + "\nreported, not expected:\n" + "\n".join(f"  {n}: {k}: {t}" for n, k, t in unexpected))


def test_the_comparison_sees_each_mark_and_each_report(tmp_path: Path) -> None:
    """Two marks on one line are two expectations; a report that no mark expects, or a mark
    with no report, shows in the comparison (so the test above cannot pass vacuously)."""
    sample = tmp_path / "sample.py"
    sample.write_text('x = f(1)  # E: one  [a]  # E: two  [b]\nreveal_type(x)  # N: Revealed type is "int"\n')
    assert expected(sample) == {(1, "error", "one  [a]"), (1, "error", "two  [b]"),
                                (2, "note", 'Revealed type is "int"')}
    output = (f"{sample}:1: error: one  [a]\n{sample}:1: note: defined here\n"
              f"{sample}:2: note: Revealed type is \"str\"\nother.py:3: error: elsewhere  [c]\n")
    assert reported(output, sample) == {(1, "error", "one  [a]"), (2, "note", 'Revealed type is "str"')}
