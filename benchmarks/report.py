"""Shared output of the benchmark scripts: print a markdown table, and append it to --out."""
from __future__ import annotations


def emit(table: str, out: str | None) -> None:
    """Print ``table``; append it to the file ``out`` too when given (e.g. a RESULTS.md draft)."""
    print(table)
    if out:
        with open(out, "a") as f:
            f.write(table)
