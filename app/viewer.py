"""Who is looking at a page, and what they may see.

An analyst sees everything and may edit. A share-link holder sees one run, or a chosen list
of its concepts, read-only. Routes ask the viewer before they read anything.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from app.models import User
from app.urls import Urls


@dataclass(frozen=True)
class ShareGrant:
    """The part of a share link that decides what its holder sees."""

    link_id: int
    run_id: int
    concept_indices: frozenset[int] | None
    """None: the whole run."""
    note: str
    created_by_name: str
    expires_at: dt.datetime | None


@dataclass(frozen=True)
class Viewer:
    urls: Urls
    user: User | None = None
    share: ShareGrant | None = None

    @property
    def can_edit(self) -> bool:
        return self.user is not None

    def sees_run(self, run_id: int) -> bool:
        """Some part of the run (its concept browser) is visible."""
        return self.share is None or self.share.run_id == run_id

    def sees_whole_run(self, run_id: int) -> bool:
        """Run-wide pages (overview, model comparison) are visible."""
        return self.sees_run(run_id) and (self.share is None or self.share.concept_indices is None)

    def sees_concept(self, run_id: int, index: int) -> bool:
        if not self.sees_run(run_id):
            return False
        scope = self.concept_scope
        return scope is None or index in scope

    @property
    def concept_scope(self) -> frozenset[int] | None:
        """The concept indices a share limits the viewer to; None when not limited."""
        return self.share.concept_indices if self.share is not None else None
