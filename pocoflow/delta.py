"""Which Store keys changed since the last checkpoint, cheaply.

A checkpoint is written after every node, but a node usually touches one or two keys
while the Store holds a 1 MB document and a long chat history. The tracker lets a
checkpoint write only the values that changed (``pf_values`` rows) plus a manifest
saying, for every key, which step's row holds its current value.

Unchanged is decided in two tiers:

* an immutable value (str, bytes, numbers, None, Decimal, UUID, datetime..., and tuples
  or frozensets of those) that ``is`` the object seen last time cannot have changed, so
  it is not even encoded: an untouched 1 MB string costs one identity test;
* anything else (lists, dicts, dataclasses...) may have been mutated in place, so it is
  re-encoded and compared with the previous text.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import Enum
from typing import Any
from uuid import UUID

from pocoflow.codec import CodecError, encode

__all__ = ["StoreTracker"]

_IMMUTABLE = frozenset(
    {str, bytes, int, float, bool, type(None), Decimal, UUID, datetime, date, time, timedelta}
)


def _is_immutable(value: Any) -> bool:
    t = type(value)
    if t in _IMMUTABLE:
        return True
    if t is tuple or t is frozenset:
        types = set(map(type, value))
        if types <= _IMMUTABLE:
            return True
        return all(_is_immutable(x) for x in value)
    # Enum members are singletons whose value cannot be reassigned.
    return isinstance(value, Enum)


class StoreTracker:
    """Remembers, per key, the last encoded text, the object it came from and the step
    whose value row holds it.

    One tracker follows one run in one process. After a resume or on another worker,
    :meth:`seed` it from the loaded checkpoint, passing the decoded objects that went
    into the Store, so untouched immutable values are recognised by identity.
    """

    def __init__(self) -> None:
        self._manifest: dict[str, int] = {}
        self._texts: dict[str, str] = {}
        self._objects: dict[str, Any] = {}

    @property
    def manifest(self) -> dict[str, int]:
        """A copy of the manifest of the last ``diff`` (or ``seed``)."""
        return dict(self._manifest)

    def seed(
        self,
        manifest: Mapping[str, int],
        texts: Mapping[str, str],
        objects: Mapping[str, Any],
    ) -> None:
        """Start from a loaded checkpoint: ``manifest`` as stored, ``texts`` the value
        texts exactly as ``encode`` wrote them, ``objects`` the decoded values now in the
        Store. A key missing from ``texts`` or ``objects`` is simply rewritten if the
        next ``diff`` cannot prove it unchanged."""
        self._manifest = dict(manifest)
        self._texts = {k: t for k, t in texts.items() if k in self._manifest}
        self._objects = {k: o for k, o in objects.items() if k in self._manifest}

    def diff(self, data: Mapping[str, Any], step: int) -> tuple[dict[str, int], dict[str, str]]:
        """``(manifest, changed)`` for the Store contents ``data`` at ``step``.

        ``manifest`` maps every key of ``data`` to the step whose row holds its value
        (deleted keys vanish); ``changed`` holds the encoded text of keys new or changed
        at ``step``. Raises ``CodecError`` naming the key if a value cannot round-trip;
        the tracker is then left as it was, so the step can be retried.
        """
        old_manifest, old_texts, old_objects = self._manifest, self._texts, self._objects
        manifest: dict[str, int] = {}
        texts: dict[str, str] = {}
        objects: dict[str, Any] = {}
        changed: dict[str, str] = {}
        for key, value in data.items():
            if type(key) is not str:
                raise CodecError(
                    f"Store key {key!r} is a {type(key).__name__}; checkpointed keys must be str",
                    key=str(key),
                )
            known_step = old_manifest.get(key)
            if known_step is not None:
                if key in old_objects and old_objects[key] is value and _is_immutable(value):
                    manifest[key] = known_step
                    objects[key] = value
                    if key in old_texts:
                        texts[key] = old_texts[key]
                    continue
                text = encode(value, key=key)
                if old_texts.get(key) == text:
                    manifest[key] = known_step
                    texts[key] = text
                    objects[key] = value
                    continue
            else:
                text = encode(value, key=key)
            manifest[key] = step
            texts[key] = text
            objects[key] = value
            changed[key] = text
        self._manifest, self._texts, self._objects = manifest, texts, objects
        return dict(manifest), changed
