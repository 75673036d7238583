"""Where each page lives, for analysts and for share-link holders.

Analysts browse `/runs/...`; a share-link holder browses the same pages under `/s/TOKEN/runs/...`.
Templates build every link through `Urls`, so a shared page only ever links inside its share.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, urlencode


@dataclass(frozen=True)
class Urls:
    prefix: str = ""
    """"" for analysts, "/s/TOKEN" for a share-link holder."""

    def home(self) -> str:
        return self.prefix or "/runs"

    def run(self, run_id: int) -> str:
        return f"{self.prefix}/runs/{run_id}"

    def concepts(self, run_id: int, query: dict[str, object] | None = None) -> str:
        base = f"{self.prefix}/runs/{run_id}/concepts"
        return f"{base}?{urlencode(query)}" if query else base

    def concepts_csv(self, run_id: int, query: dict[str, object] | None = None) -> str:
        """The browser view's concepts, all pages, as a CSV download (paging parameters dropped)."""
        kept = {k: v for k, v in (query or {}).items() if k not in ("page", "per_page")}
        base = f"{self.prefix}/runs/{run_id}/concepts.csv"
        return f"{base}?{urlencode(kept)}" if kept else base

    def concept(self, run_id: int, index: int, view: dict[str, object] | None = None) -> str:
        """A concept's page; with `view` (ConceptFilters.view_query), as opened from that list, so
        its previous / next step through the list."""
        base = f"{self.prefix}/runs/{run_id}/concepts/{index}"
        return f"{base}?{urlencode(view)}" if view else base

    def compare(self, run_id: int, a: str | None = None, b: str | None = None, show: str | None = None) -> str:
        """Models a and b compared; `show` lists one group in full (app.services.compare.GROUPS)."""
        base = f"{self.prefix}/runs/{run_id}/compare"
        query = {"a": a, "b": b, **({"show": show} if show else {})}
        return f"{base}?{urlencode(query)}" if a and b else base

    def media(self, relative_path: str) -> str:
        """A file under the data directory's media folder (thumbnails, heatmaps, CAM images)."""
        return f"{self.prefix}/media/{quote(relative_path)}"


ANALYST_URLS = Urls()


def share_urls(token: str) -> Urls:
    return Urls(prefix=f"/s/{quote(token, safe='')}")
