"""argparse types that refuse impossible numbers up front, naming the flag (argparse adds it)."""
from __future__ import annotations

import argparse

__all__ = ["positive_int", "non_negative_int", "positive_float", "non_negative_float", "probability"]


def _number(kind, text: str, ok, rule: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {rule}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {rule}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v > 0, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: v > 0, "a number > 0")


def non_negative_float(text: str) -> float:
    return _number(float, text, lambda v: v >= 0, "a number >= 0")


def probability(text: str) -> float:
    return _number(float, text, lambda v: 0 <= v <= 1, "a number between 0 and 1")
