"""Retry delays as a pure function, so the local loop and Celery schedule the same waits.

Exponential backoff with optional "full jitter" spread: many workers retrying the same
rate-limited LLM endpoint should not all come back at the same instant.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def retry_delay(
    failed_attempts: int,
    *,
    base: float,
    factor: float = 1.0,
    maximum: float = 300.0,
    jitter: float = 0.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after ``failed_attempts`` (>= 1) failed tries of ``exec``.

    ``base * factor ** (failed_attempts - 1)`` capped at ``maximum``; ``jitter`` in
    ``[0, 1]`` takes up to that fraction off at random. ``factor=1`` and ``jitter=0``
    give 0.2's fixed ``retry_delay``.
    """
    if failed_attempts < 1:
        raise ValueError(f"failed_attempts must be >= 1, got {failed_attempts}")
    if base <= 0:
        return 0.0
    delay = min(base * factor ** (failed_attempts - 1), maximum)
    if jitter:
        delay -= delay * min(max(jitter, 0.0), 1.0) * rand()
    return delay
