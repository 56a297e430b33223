"""Helpers shared by the tests (not a test module)."""

from __future__ import annotations


def error_line(err: str) -> str:
    """The one error line a failed command printed on stderr (progress bars of loading may precede it)."""
    assert "Traceback" not in err, err
    lines = [line.strip() for line in err.replace("\r", "\n").splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]
