"""Argument definitions and thin handlers for plan/compile/train/validate/explore/calibrate."""

from __future__ import annotations


def register(add) -> None:
    return None
