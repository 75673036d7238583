"""prefetch(): order, errors, and a reader that stops when the consumer leaves."""

from __future__ import annotations

import itertools
import threading

import pytest

from usae_core.prefetch import prefetch


@pytest.fixture(autouse=True)
def _no_thread_left_behind():
    before = set(threading.enumerate())
    yield
    assert set(threading.enumerate()) <= before, "a reader thread outlived its consumer"


def test_items_arrive_in_order_and_the_reader_ends():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))


def test_a_reader_error_reaches_the_consumer_after_the_items_before_it():
    def source():
        yield 1
        yield 2
        raise ValueError("bad shard")

    seen = []
    with pytest.raises(ValueError, match="bad shard"):
        for item in prefetch(source()):
            seen.append(item)
    assert seen == [1, 2]


def test_closing_early_stops_a_reader_of_an_endless_source():
    produced = itertools.count()
    batches = prefetch(produced, depth=2)
    assert [next(batches) for _ in range(3)] == [0, 1, 2]
    batches.close()
    assert next(produced) <= 3 + 2 + 2  # read at most a queue's worth (+1 in hand) past the consumer
