"""Passwords, the signed session, CSRF tokens and log-in throttling.

The session is Starlette's signed cookie (itsdangerous): it holds only the analyst's id and
the CSRF token, never a password. CSRF uses the synchroniser-token pattern: every form carries
the session's token in a hidden field and every htmx/API write sends it in a header.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import defaultdict, deque

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


class LoginThrottle:
    """Failed log-ins per (client IP, user name) in a sliding one-minute window.

    Once the limit is reached every attempt for that key is refused, even with the right
    password, until old failures leave the window; a successful log-in clears the key.
    """

    window_s = 60.0

    def __init__(self, max_failures_per_minute: int):
        self.max_failures = max_failures_per_minute
        self._failures: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    @staticmethod
    def key(client_ip: str, username: str) -> tuple[str, str]:
        return client_ip, username.strip().lower()

    def _prune(self, key: tuple[str, str], now: float) -> deque[float]:
        times = self._failures[key]
        while times and now - times[0] >= self.window_s:
            times.popleft()
        return times

    def retry_after_s(self, key: tuple[str, str]) -> int:
        """0 when an attempt is allowed, else whole seconds until the next one is."""
        with self._lock:
            now = time.monotonic()
            times = self._prune(key, now)
            if len(times) < self.max_failures:
                return 0
            return max(1, int(self.window_s - (now - times[0])) + 1)

    def record_failure(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._failures[key].append(time.monotonic())

    def reset(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._failures.pop(key, None)
