"""Sign-in throttling in a sliding one-minute window, counted in the database so that every
server process sees the same attempts. Two limits apply to every attempt:

- per client address and user name (`per_name`): guessing one analyst's password;
- per client address over all names (`per_address`, set larger): trying one password on many
  names (spraying), which also costs an argon2 check each. IPv6 clients count by their
  /64 network, which one host usually holds whole.

There is no limit per name over all addresses: anyone could then lock an analyst out by
failing to sign in as them.

An attempt takes its place under both keys before the password is checked (`begin`), and only
a successful sign-in gives the name key's places back (`succeeded`): attempts sent together
cannot all pass while argon2 runs. Once a limit is reached every attempt under that key is
refused, even with the right password, until old attempts leave the window. Keys are stored
as SHA-256 digests (any name costs 64 characters), and attempts that left the window are
deleted as new ones arrive. Processes racing at the same instant can each take the last place,
so a limit can be passed by at most the number of server processes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import math
import threading

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from app.models import SignInAttempt, utcnow


def client_network(client: str) -> str:
    """The address an attempt counts against: IPv4 as is, IPv6 as its /64 (a port or brackets a
    proxy may have left on it are dropped, or every connection would count apart)."""
    host = client.strip()
    if host.startswith("[") and "]" in host:  # [2001:db8::1] or [2001:db8::1]:443
        host = host[1:host.index("]")]
    elif host.count(":") == 1:  # 10.0.0.1:5678
        host = host.split(":")[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return client
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class LoginThrottle:
    window = dt.timedelta(seconds=60)

    def __init__(self, sessions: sessionmaker[Session], *, per_name: int, per_address: int):
        self.per_name = per_name
        self.per_address = per_address
        self._sessions = sessions
        self._lock = threading.Lock()  # this process's own requests queue here, not in the database

    @staticmethod
    def name_key(client: str, username: str) -> str:
        return hashlib.sha256(f"{client_network(client)}\0{username.strip().lower()}".encode()).hexdigest()

    @staticmethod
    def address_key(client: str) -> str:
        return hashlib.sha256(f"address\0{client_network(client)}".encode()).hexdigest()

    def begin(self, client: str, username: str) -> int:
        """0 when this attempt may go ahead (it now counts under both keys), else whole seconds
        until the next one may."""
        limits = ((self.name_key(client, username), self.per_name), (self.address_key(client), self.per_address))
        with self._lock, self._sessions.begin() as session:
            now = utcnow()
            session.execute(delete(SignInAttempt).where(SignInAttempt.at <= now - self.window))
            wait = 0
            for key, limit in limits:
                times = session.scalars(select(SignInAttempt.at).where(SignInAttempt.key_hash == key)
                                        .order_by(SignInAttempt.at)).all()
                if len(times) >= limit:
                    # the place frees when the oldest attempt that keeps the key at its limit leaves
                    oldest = times[len(times) - limit]
                    wait = max(wait, 1, math.ceil((self.window - (now - oldest)).total_seconds()))
            if wait:
                return wait
            session.add_all(SignInAttempt(key_hash=key, at=now) for key, _ in limits)
            return 0

    def succeeded(self, client: str, username: str) -> None:
        """The right password gives back this name's places (not the address's: signing in to
        one's own account must not reset a spraying budget)."""
        with self._lock, self._sessions.begin() as session:
            session.execute(delete(SignInAttempt).where(SignInAttempt.key_hash == self.name_key(client, username)))
