"""A small thread-safe least-recently-used map, for the web app's in-process caches."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LruCache(Generic[V]):
    """Holds values whose weights (`weigh`, 1 each by default) add up to at most `capacity`,
    dropping the least recently used first. Safe to share between request threads."""

    def __init__(self, capacity: int, weigh: Callable[[V], int] = lambda _: 1):
        self._values: OrderedDict[Hashable, V] = OrderedDict()
        self._capacity = capacity
        self._weigh = weigh
        self._weight = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            if key not in self._values:
                return None
            self._values.move_to_end(key)
            return self._values[key]

    def put(self, key: Hashable, value: V) -> None:
        weight = self._weigh(value)
        if weight > self._capacity:
            return
        with self._lock:
            if key in self._values:
                self._weight -= self._weigh(self._values.pop(key))
            self._values[key] = value
            self._weight += weight
            while self._weight > self._capacity:
                _, dropped = self._values.popitem(last=False)
                self._weight -= self._weigh(dropped)
