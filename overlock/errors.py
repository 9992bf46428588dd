"""Errors a user can fix. Library code raises them; the ``overlock`` command prints their message and exits 2."""
from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """A flag, argument or setting that cannot work as given; the message names it and says what to do."""
