"""Helpers shared by the command-line tools."""
from __future__ import annotations

__all__ = ['description']


def description(doc: str) -> str:
    """The first paragraph of a tool's module docstring, as one line (its ``--help`` description)."""
    first = doc.strip().split('\n\n')[0]
    return ' '.join(line.strip() for line in first.splitlines())
