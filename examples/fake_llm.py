"""A deterministic stand-in for an LLM, so examples, tests and the demo run offline.

Answers depend only on the prompt (a hash picks the wording); ``fail_first`` makes the
first tries of a prompt raise, to show retries. ``delay`` imitates network latency.

A failure depends on the step's ``attempt`` when the caller passes it, not only on what
this process has seen: on workers a retry is a new attempt, often in another process,
which must then succeed (a per-process count would fail it again with the same message).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter


class FakeLLMError(RuntimeError):
    """The transient failure a real provider gives under load (429/503)."""


class FakeLLM:
    def __init__(self, *, fail_first: int = 0, delay: float = 0.0) -> None:
        self.fail_first = fail_first
        self.delay = delay
        self.calls: Counter[str] = Counter()

    def complete(self, prompt: str, attempt: int = 1) -> str:
        """The answer to ``prompt``; the first ``fail_first`` tries raise. Tries are
        counted by ``attempt`` (workers: one per retry) plus, within one attempt, the calls
        this process made (local retries all run as attempt 1)."""
        self.calls[prompt] += 1
        key = f"{attempt}\0{prompt}"
        self.calls[key] += 1
        if self.delay:
            time.sleep(self.delay)
        tries = attempt - 1 + self.calls[key]
        if tries <= self.fail_first:
            raise FakeLLMError(f"rate limited (try {tries} of this prompt, attempt {attempt})")
        digest = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
        kind = prompt.split(":", 1)[0].strip().lower()
        subject = prompt.split(":", 1)[-1].strip()
        if kind == "outline":
            angles = ["history", "how it works", "trade-offs", "what comes next", "pitfalls"]
            start = digest % len(angles)
            return "\n".join(f"- {angles[(start + i) % len(angles)]}" for i in range(3))
        if kind == "draft":
            return f"{subject.capitalize()}: a short section ({digest % 90 + 60} words)."
        if kind == "review":
            # Deterministic, but not always happy: drafts with an odd hash need one rework.
            return "revise" if digest % 2 and "(revised)" not in subject else "approve"
        if kind == "summary":
            return f"In short: {subject[:60]}"
        return f"echo: {subject}"
