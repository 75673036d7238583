"""The browser's order of a run's concepts, kept in memory per view.

Which concepts a view shows, and in what order, depends only on mined statistics when its
filters are statistic-only (dead, firing entropy, "mostly in model X", a share's concept
list) and its sort is one of the statistics: a mine replaces those statistics only together
with the run's active generation (`mining._activate`), and generation ids are never reused.
So the ordered concept ids of such a view are read once, under the generation, and every
page of it is then a slice: no `OFFSET` walk of a sort index (SQLite steps through every row
before the page), no count, and "mostly in model X" needs no sort of the matching set per
page. The page's own rows (labels, which an edit changes) are read by id afterwards.

Views that filter on labels, tags or search text change with every edit: the browser pages
them in SQL, and a concept page's previous/next walk of one keeps its ids under the newest
label edit (`concepts._order_key`).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Hashable

from app.lru import LruCache

ORDER_CACHE_BYTES = 32 * 2**20
"""Per server process: 8 bytes per concept and view, so about 128 views of a 32,768-concept run."""


def _weigh(ids: array) -> int:
    return ids.itemsize * len(ids) + 64


_orders: LruCache[array] = LruCache(ORDER_CACHE_BYTES, weigh=_weigh)


def ordered_ids(key: Hashable, read: Callable[[], list[int]]) -> array:
    """The view's concept ids in browser order: cached under `key`, else from `read()`."""
    ids = _orders.get(key)
    if ids is None:
        ids = array("q", read())
        _orders.put(key, ids)
    return ids
