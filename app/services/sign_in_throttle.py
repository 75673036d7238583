"""Sign-in throttling: attempts per (client address, user name) in a sliding one-minute window,
counted in the database so that every server process sees the same attempts.

An attempt takes its place in the window before the password is checked (`begin`), and only a
successful sign-in gives the key's places back (`succeeded`): attempts sent together cannot
all pass while argon2 runs. Once the limit is reached every attempt for that key is refused,
even with the right password, until old attempts leave the window. Keys are stored as SHA-256
digests (any name costs 64 characters), and attempts that left the window are deleted as new
ones arrive. Processes racing at the same instant can each take the last place, so the limit
can be passed by at most the number of server processes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from app.models import SignInAttempt, utcnow


class LoginThrottle:
    window = dt.timedelta(seconds=60)

    def __init__(self, max_attempts_per_minute: int, sessions: sessionmaker[Session]):
        self.max_attempts = max_attempts_per_minute
        self._sessions = sessions
        self._lock = threading.Lock()  # this process's own requests queue here, not in the database

    @staticmethod
    def key(client_ip: str, username: str) -> str:
        return hashlib.sha256(f"{client_ip}\0{username.strip().lower()}".encode()).hexdigest()

    def begin(self, key: str) -> int:
        """0 when this attempt may go ahead (it now counts against the key), else whole seconds
        until the next one may."""
        with self._lock, self._sessions.begin() as session:
            now = utcnow()
            session.execute(delete(SignInAttempt).where(SignInAttempt.at <= now - self.window))
            times = session.scalars(select(SignInAttempt.at).where(SignInAttempt.key_hash == key)
                                    .order_by(SignInAttempt.at)).all()
            if len(times) >= self.max_attempts:
                return max(1, int((self.window - (now - times[0])).total_seconds()) + 1)
            session.add(SignInAttempt(key_hash=key, at=now))
            return 0

    def succeeded(self, key: str) -> None:
        with self._lock, self._sessions.begin() as session:
            session.execute(delete(SignInAttempt).where(SignInAttempt.key_hash == key))
