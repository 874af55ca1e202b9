"""Parsing of command-line values shared by the top-level scripts (train.py, sample.py,
evaluate.py). Library functions take the parsed values; only the scripts call these."""

from __future__ import annotations


def parse_steps(text: str | None) -> int | str | None:
    """A command line's --steps: None stays None (all T), digits become an int S, anything else
    ('ddimS', 'S1,S2,...') is passed on to `plans.space_timesteps` as a string."""
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.isdigit() else text

