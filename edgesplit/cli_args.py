"""Argument types shared by the CLI modules: comma-separated lists, refused with the text given."""

from __future__ import annotations

import argparse


def int_list(text: str) -> list[int]:
    """'0,12,30' -> [0, 12, 30]."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> list[float]:
    """'70,80.5' -> [70.0, 80.5]."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def str_list(text: str) -> tuple[str, ...]:
    """'q4,q8' -> ('q4', 'q8')."""
    return tuple(part.strip() for part in text.split(",") if part.strip())
