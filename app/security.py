"""Passwords, the signed session, CSRF tokens, and audit-link tokens kept out of the access log.

The session is Starlette's signed cookie (itsdangerous): it holds only the analyst's id and
the CSRF token, never a password. CSRF uses the synchroniser-token pattern: every form carries
the session's token in a hidden field and every htmx/API write sends it in a header.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from starlette.requests import Request

SESSION_COOKIE = "usae_session"
SESSION_MAX_AGE_S = 14 * 24 * 3600
SESSION_USER_KEY = "user_id"
SESSION_EPOCH_KEY = "epoch"
CSRF_SESSION_KEY = "csrf"
CSRF_FORM_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def csrf_token(request: Request) -> str:
    """The session's CSRF token, created on first use (also for visitors who are not logged in,
    so the log-in form itself is protected)."""
    token = request.session.get(CSRF_SESSION_KEY)
    if not token:
        token = secrets.token_urlsafe(32)
        request.session[CSRF_SESSION_KEY] = token
    return token


async def csrf_is_valid(request: Request) -> bool:
    """True when the request is safe, or carries the session's token in the header or form."""
    if request.method not in UNSAFE_METHODS:
        return True
    expected = request.session.get(CSRF_SESSION_KEY)
    if not expected:
        return False
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        # Starlette caches the parsed form, so the endpoint's Form(...) parameters still work.
        sent = (await request.form()).get(CSRF_FORM_FIELD)
    return isinstance(sent, str) and hmac.compare_digest(sent, expected)


def start_session(request: Request, user_id: int, epoch: int) -> None:
    """Log in: a fresh session (new CSRF token) so a token planted before log-in is useless."""
    request.session.clear()
    request.session[SESSION_USER_KEY] = user_id
    request.session[SESSION_EPOCH_KEY] = epoch
    csrf_token(request)


def session_user(request: Request) -> tuple[int, int] | None:
    """(user id, epoch) the session was started with, if any."""
    user_id, epoch = request.session.get(SESSION_USER_KEY), request.session.get(SESSION_EPOCH_KEY)
    return (user_id, epoch) if isinstance(user_id, int) and isinstance(epoch, int) else None


def end_session(request: Request) -> None:
    request.session.clear()


class ShareTokenLogFilter(logging.Filter):
    """Keeps audit-link tokens out of the access log: `/s/TOKEN/...` is logged as
    `/s/#abcdef01/...`, the start of the token's SHA-256, which is what `share_links.token_hash`
    stores (an administrator can still tell which link was used; the log cannot open it)."""

    _SHARE_PATH = re.compile(r"(/s/)([^/?#\s]+)")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, str) and "/s/" in a for a in record.args):
            record.args = tuple(self._SHARE_PATH.sub(self._hashed, a) if isinstance(a, str) else a
                                for a in record.args)
        elif isinstance(record.msg, str) and "/s/" in record.msg:
            record.msg = self._SHARE_PATH.sub(self._hashed, record.msg)
        return True

    @staticmethod
    def _hashed(match: re.Match) -> str:
        return f"{match.group(1)}#{hashlib.sha256(match.group(2).encode()).hexdigest()[:8]}"


def keep_share_tokens_out_of_access_logs() -> None:
    """Install ShareTokenLogFilter on uvicorn's access logger, once per process."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, ShareTokenLogFilter) for f in access.filters):
        access.addFilter(ShareTokenLogFilter())
