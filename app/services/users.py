"""Analyst accounts: create them and check passwords."""

from __future__ import annotations

import os
import re
import threading

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import User
from app.security import hash_password, verify_password
from usae_core.errors import UsaeError

USERNAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024
PASSWORD_CHECKS = max(1, (os.cpu_count() or 1) // 2)
PASSWORD_CHECK_WAIT_S = 10.0
_password_checks = threading.BoundedSemaphore(PASSWORD_CHECKS)
# Verified when the user name is unknown, so a miss costs as much time as a wrong password
# and response times do not reveal which accounts exist.
_DUMMY_HASH = hash_password("not-a-real-password")


def create_user(session: Session, *, username: str, password: str) -> User:
    """Add an analyst; one-line UsaeError for a bad name, a short password or a taken name."""
    if not USERNAME_PATTERN.match(username):
        raise UsaeError("user names are 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit")
    _check_password(password)
    if find_user(session, username=username) is not None:
        raise UsaeError(f"user {username!r} already exists")
    user = User(username=username, password_hash=hash_password(password))
    session.add(user)
    session.flush()
    return user


def set_password(session: Session, *, username: str, password: str) -> User:
    """Give an analyst a new password and sign them out everywhere (a reset usually means the
    old one leaked); one-line UsaeError for an unknown name or a short password."""
    _check_password(password)
    user = find_user(session, username=username)
    if user is None:
        raise UsaeError(f"no analyst named {username!r} (see `usae user list`)")
    user.password_hash = hash_password(password)
    end_all_sessions(session, user=user)
    return user


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(func.lower(User.username))))


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UsaeError(f"passwords need at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise UsaeError(f"passwords have at most {MAX_PASSWORD_LENGTH} characters")


def find_user(session: Session, *, username: str) -> User | None:
    """Case-insensitive look-up, so 'Alice' and 'alice' are one account."""
    return session.scalar(select(User).where(func.lower(User.username) == username.strip().lower()))


class SignInBusy(Exception):
    """More sign-ins wait for a password check than it is worth queueing."""


def authenticate(session: Session, *, username: str, password: str) -> User | None:
    """The active analyst with this name and password, else None. A name no account can have
    or an over-long password is refused without a check (that reveals nothing about which
    accounts exist). At most `PASSWORD_CHECKS` checks run at once per process, as each holds a
    core and 64 MiB for about 0.2 s; one that waits gives its database connection back first and
    raises SignInBusy after `PASSWORD_CHECK_WAIT_S`."""
    if not USERNAME_PATTERN.match(username.strip()) or len(password) > MAX_PASSWORD_LENGTH:
        return None
    user = find_user(session, username=username)
    stored = user.password_hash if user is not None and user.is_active else _DUMMY_HASH
    session.rollback()  # the read is done: no connection held while queueing for a check
    if not _password_checks.acquire(timeout=PASSWORD_CHECK_WAIT_S):
        raise SignInBusy
    try:
        return user if verify_password(stored, password) and stored is not _DUMMY_HASH else None
    finally:
        _password_checks.release()


def active_user(session: Session, *, user_id: int, epoch: int) -> User | None:
    """The analyst of a session started in `epoch`, while the account is active and has not
    signed out since."""
    user = session.get(User, user_id)
    return user if user is not None and user.is_active and user.session_epoch == epoch else None


def end_all_sessions(session: Session, *, user: User) -> None:
    """Sign the analyst out everywhere: every session cookie issued so far stops working."""
    user.session_epoch += 1
    session.flush()
