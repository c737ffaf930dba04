"""A dict of a process's newest entries, for memories that must not grow with every job seen."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    """At most `kept` entries: storing one makes it the newest, and past `kept` the oldest goes.
    `get` counts as a use (the entry becomes the newest); `peek` and `in` do not."""

    def __init__(self, kept: int) -> None:
        self.kept = kept
        self._entries: OrderedDict[K, V] = OrderedDict()

    def put(self, key: K, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.kept:
            self._entries.popitem(last=False)

    __setitem__ = put

    def get(self, key: K, default: V | None = None) -> V | None:
        if key not in self._entries:
            return default
        self._entries.move_to_end(key)
        return self._entries[key]

    def peek(self, key: K, default: V | None = None) -> V | None:
        return self._entries.get(key, default)

    def pop(self, key: K, default: V | None = None) -> V | None:
        return self._entries.pop(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)
