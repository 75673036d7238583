"""Label edits with history and optimistic concurrency.

The editor sends back the concept version it showed. If someone saved in between, the
versions differ and the edit is refused with the current state, never silently overwritten.
The ORM also guards the UPDATE itself (`version_id_col`), which catches the race between
reading the version here and writing it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from app.models import Concept, LabelHistory, User, utcnow
from app.schemas.concepts import HistoryEntry
from app.schemas.labels import MAX_TAG, MAX_TAGS, LabelEdit, LabelState
from app.services.text import storable
from usae_core.errors import UsaeError


class LabelConflict(Exception):
    """Someone else saved first; `current` is what they saved."""

    def __init__(self, current: LabelState, editor: str):
        super().__init__(f"{editor} changed this label while you were editing it")
        self.current = current
        self.editor = editor


def parse_tags(text: str) -> list[str]:
    """'defect, Scratch  ,edge' -> ['defect', 'edge', 'scratch']."""
    return normalize_tags(text.split(","))


def normalize_tags(tags: Iterable[str]) -> list[str]:
    """Trimmed, lower case, unique and sorted (the order the database gives them back in)."""
    cleaned = [re.sub(r"\s+", " ", t).strip().lower() for t in tags]
    unique = sorted(set(t for t in cleaned if t))
    too_long = [t for t in unique if len(t) > MAX_TAG]
    if too_long:
        raise UsaeError(f"tags have at most {MAX_TAG} characters: {too_long[0][:20]}…")
    if len(unique) > MAX_TAGS:
        raise UsaeError(f"a concept has at most {MAX_TAGS} tags")
    return unique


def label_state(concept: Concept) -> LabelState:
    return LabelState(index=concept.index, label=concept.label, description=concept.description,
                      tags=concept.tags, version=concept.version)


def _last_editor(session: Session, concept_id: int) -> str:
    name = session.scalar(select(LabelHistory.username).where(LabelHistory.concept_id == concept_id)
                          .order_by(LabelHistory.version.desc()).limit(1))
    return name or "Someone"


def update_label(session: Session, *, concept: Concept, editor: User, edit: LabelEdit) -> LabelState:
    """Apply `edit` and record it in the history; LabelConflict when `edit.version` is stale.
    An edit that changes nothing is accepted without a new version or history entry."""
    label, description = storable(edit.label.strip(), "label"), storable(edit.description.strip(), "description")
    tags = [storable(tag, "tag") for tag in normalize_tags(edit.tags)]
    if edit.version != concept.version:
        raise LabelConflict(label_state(concept), _last_editor(session, concept.id))
    old = label_state(concept)
    if (old.label, old.description, old.tags) == (label, description, tags):
        return old
    concept.label, concept.description = label, description
    concept.replace_tags(tags)
    concept.updated_at = utcnow()
    try:
        session.flush()
    except StaleDataError:
        session.rollback()
        fresh = session.get(Concept, concept.id, populate_existing=True)
        assert fresh is not None
        raise LabelConflict(label_state(fresh), _last_editor(session, fresh.id)) from None
    session.add(LabelHistory(
        concept_id=concept.id, user_id=editor.id, username=editor.username, version=concept.version,
        old_label=old.label, new_label=label, old_description=old.description, new_description=description,
        old_tags=old.tags, new_tags=tags,
    ))
    session.flush()
    return label_state(concept)


def label_history(session: Session, *, concept_id: int) -> list[HistoryEntry]:
    """Newest first."""
    rows = session.scalars(select(LabelHistory).where(LabelHistory.concept_id == concept_id)
                           .order_by(LabelHistory.version.desc(), LabelHistory.id.desc()))
    return [HistoryEntry(username=r.username, changed_at=r.changed_at, version=r.version, old_label=r.old_label,
                         new_label=r.new_label, old_description=r.old_description,
                         new_description=r.new_description, old_tags=list(r.old_tags), new_tags=list(r.new_tags))
            for r in rows]
