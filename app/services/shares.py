"""Read-only audit links: create, resolve, list and revoke.

A token is 32 random bytes (256 bits) in URL-safe base64. Only its SHA-256 is stored, so a
leaked database does not leak working links; the look-up is by that hash and the match is
confirmed with a constant-time comparison.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import secrets
from collections.abc import Sequence

from sqlalchemy import select, tuple_, update
from sqlalchemy.orm import Session, selectinload

from app.models import Concept, Run, ShareLink, User, utcnow
from app.schemas.concepts import ConceptFilters
from app.schemas.shares import ShareCreated, ShareInfo
from app.services.concepts import conditions, order_by
from app.services.text import storable
from app.urls import share_urls
from app.viewer import ShareGrant
from usae_core.errors import UsaeError

TOKEN_BYTES = 32
MAX_SHARED_CONCEPTS = 500
DEFAULT_SHARE_DAYS = 30
"""How long a link works when its creator names no expiry: every link expires."""
MAX_SHARE_DAYS = 365
LISTED_CONCEPTS = 6
"""The list of links names this many of a concept link's concepts, then says how many more."""


class ShareNotFound(Exception):
    """No link has this token."""


class ShareGone(Exception):
    """The link exists but was revoked or has expired; `reason` says which, plainly."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def share_status(link: ShareLink, now: dt.datetime | None = None) -> str:
    now = now or utcnow()
    if link.revoked_at is not None:
        return "revoked"
    if link.expires_at is not None and link.expires_at <= now:
        return "expired"
    return "active"


def share_info(link: ShareLink) -> ShareInfo:
    return ShareInfo(
        id=link.id, run_id=link.run_id, run_name=link.run.name, scope=link.scope,  # type: ignore[arg-type]
        concept_indices=list(link.concept_indices), note=link.note,
        created_by=link.creator.username if link.creator else "(deleted account)",
        created_at=link.created_at, expires_at=link.expires_at, revoked_at=link.revoked_at,
        status=share_status(link),  # type: ignore[arg-type]
    )


def create_share(session: Session, *, run: Run, creator: User, scope: str, concept_indices: Sequence[int],
                 note: str, expires_at: dt.datetime | None) -> ShareCreated:
    """A new link; the returned token is the only time it exists outside the holder's hands."""
    indices: list[int] = []
    if scope == "concepts":
        indices = sorted(set(int(i) for i in concept_indices))
        if not indices:
            raise UsaeError("choose at least one concept to share")
        if len(indices) > MAX_SHARED_CONCEPTS:
            raise UsaeError(f"a link can show at most {MAX_SHARED_CONCEPTS} concepts; share the whole run instead")
        known = set(session.scalars(select(Concept.index).where(Concept.run_id == run.id,
                                                                Concept.index.in_(indices))))
        missing = [i for i in indices if i not in known]
        if missing:
            raise UsaeError(f"run {run.name!r} has no concept {', '.join(map(str, missing[:5]))}")
    elif scope != "run":
        raise UsaeError(f"scope must be 'run' or 'concepts', got {scope!r}")
    now = utcnow()
    if expires_at is None:
        expires_at = now + dt.timedelta(days=DEFAULT_SHARE_DAYS)
    if expires_at.tzinfo is None:
        raise UsaeError("the expiry needs a time zone")
    if expires_at <= now:
        raise UsaeError("the expiry is in the past")
    if expires_at > now + dt.timedelta(days=MAX_SHARE_DAYS):
        raise UsaeError(f"a link can work for at most {MAX_SHARE_DAYS} days; choose an earlier expiry")
    token = secrets.token_urlsafe(TOKEN_BYTES)
    link = ShareLink(token_hash=hash_token(token), scope=scope, run_id=run.id, concept_indices=indices,
                     note=storable(note.strip(), "note"), created_by=creator.id, expires_at=expires_at)
    link.run, link.creator = run, creator
    session.add(link)
    session.flush()
    return ShareCreated(**share_info(link).model_dump(), token=token, url=share_urls(token).home())


def get_share(session: Session, *, share_id: int) -> ShareInfo:
    link = session.get(ShareLink, share_id)
    if link is None:
        raise ShareNotFound()
    return share_info(link)


def reveal_share(session: Session, *, share_id: int, creator_id: int, token: str) -> ShareCreated | None:
    """The link `share_id` with its token, for the page that shows a new link once: only when
    `token` is that link's own, `creator_id` made it and it still works; None otherwise."""
    link = session.get(ShareLink, share_id)
    if (link is None or link.created_by != creator_id or share_status(link) != "active"
            or not hmac.compare_digest(link.token_hash, hash_token(token))):
        return None
    return ShareCreated(**share_info(link).model_dump(), token=token, url=share_urls(token).home())


def _handoff_pad(key: bytes, nonce: bytes, context: str) -> bytes:
    return hmac.new(key, b"usae share hand-off\0" + nonce + context.encode(), hashlib.sha256).digest()


def seal_token(key: bytes, token: str, *, context: str) -> str:
    """`token` masked for the minutes it waits in its link's row for the page that shows it:
    XOR with HMAC-SHA256(key, fresh nonce, context), a one-time pad only the server can make
    again, so a copy of the database alone does not give it away. `context` (the analyst and the
    link) must match to open it."""
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    if len(raw) != TOKEN_BYTES:
        raise ValueError("not an audit-link token")
    nonce = secrets.token_bytes(16)
    masked = bytes(a ^ b for a, b in zip(raw, _handoff_pad(key, nonce, context), strict=True))
    return base64.urlsafe_b64encode(nonce + masked).decode()


def open_token(key: bytes, sealed: object, *, context: str) -> str | None:
    """The token `seal_token` masked with the same key and context; None for anything else.
    (A wrong context gives a wrong token, which `reveal_share` then refuses.)"""
    try:
        blob = base64.urlsafe_b64decode(sealed) if isinstance(sealed, str) else b""
    except ValueError:
        return None
    if len(blob) != 16 + TOKEN_BYTES:
        return None
    nonce, masked = blob[:16], blob[16:]
    raw = bytes(a ^ b for a, b in zip(masked, _handoff_pad(key, nonce, context), strict=True))
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def start_handoff(session: Session, *, share_id: int, sealed: str, seconds: float) -> None:
    """Keep link `share_id`'s sealed token for the page that shows it once, for `seconds`; and
    forget every hand-off past its time (a page never visited leaves nothing behind for long)."""
    now = utcnow()
    session.execute(update(ShareLink).where(ShareLink.handoff_until < now)
                    .values(handoff=None, handoff_until=None))
    session.execute(update(ShareLink).where(ShareLink.id == share_id)
                    .values(handoff=sealed, handoff_until=now + dt.timedelta(seconds=seconds)))


def take_handoff(session: Session, *, share_id: int, creator_id: int) -> str | None:
    """Link `share_id`'s sealed token for its creator, once: cleared by an UPDATE that matches
    only the value read, so of two loads at the same moment one gets it; None when gone, late
    or not theirs."""
    row = session.execute(select(ShareLink.handoff, ShareLink.handoff_until).where(
        ShareLink.id == share_id, ShareLink.created_by == creator_id, ShareLink.handoff.is_not(None))).first()
    if row is None:
        return None
    taken = session.execute(update(ShareLink).where(ShareLink.id == share_id, ShareLink.handoff == row.handoff)
                            .values(handoff=None, handoff_until=None)
                            .execution_options(synchronize_session=False)).rowcount
    return row.handoff if taken == 1 and row.handoff_until >= utcnow() else None


def view_concept_indices(session: Session, *, run: Run, filters: ConceptFilters) -> list[int]:
    """The concept numbers a browser view lists, on all its pages, in its order."""
    return list(session.scalars(select(Concept.index).where(*conditions(run, filters, None))
                                .order_by(*order_by(filters))))


def resolve_share(session: Session, *, token: str) -> ShareGrant:
    """What the holder of `token` may see; ShareNotFound or ShareGone otherwise."""
    wanted = hash_token(token)
    link = session.scalar(select(ShareLink).options(selectinload(ShareLink.creator))
                          .where(ShareLink.token_hash == wanted))
    if link is None or not hmac.compare_digest(link.token_hash, wanted):
        raise ShareNotFound()
    status = share_status(link)
    if status == "revoked":
        raise ShareGone(f"This audit link was revoked on {link.revoked_at:%d %b %Y at %H:%M} UTC.")
    if status == "expired":
        raise ShareGone(f"This audit link expired on {link.expires_at:%d %b %Y at %H:%M} UTC.")
    return ShareGrant(
        link_id=link.id, run_id=link.run_id,
        concept_indices=frozenset(link.concept_indices) if link.scope == "concepts" else None,
        note=link.note, created_by_name=link.creator.username if link.creator else "an analyst",
        expires_at=link.expires_at,
    )


def list_shares(session: Session) -> list[ShareInfo]:
    links = session.scalars(select(ShareLink).options(selectinload(ShareLink.run), selectinload(ShareLink.creator))
                            .order_by(ShareLink.created_at.desc(), ShareLink.id.desc()))
    return [share_info(link) for link in links]


def listed_concept_labels(session: Session, shares: Sequence[ShareInfo]) -> dict[tuple[int, int], str]:
    """(run id, concept index) -> label, for the concepts the list of links names (the first
    LISTED_CONCEPTS of each concept link); unlabelled concepts are left out."""
    wanted = {(s.run_id, i) for s in shares for i in s.concept_indices[:LISTED_CONCEPTS]}
    if not wanted:
        return {}
    rows = session.execute(select(Concept.run_id, Concept.index, Concept.label)
                           .where(tuple_(Concept.run_id, Concept.index).in_(sorted(wanted)), Concept.label != ""))
    return {(run, index): label for run, index, label in rows}


def revoke_share(session: Session, *, share_id: int) -> ShareInfo:
    """Revoke now (revoking twice keeps the first time)."""
    link = session.get(ShareLink, share_id)
    if link is None:
        raise ShareNotFound()
    if link.revoked_at is None:
        link.revoked_at = utcnow()
        session.flush()
    return share_info(link)
