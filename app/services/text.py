"""User text on its way into the database."""

from __future__ import annotations

from usae_core.errors import UsaeError


def storable(value: str, what: str) -> str:
    """`value`, refused when a database could not keep it: PostgreSQL text cannot hold NUL
    characters, so they are refused on every backend, before anything is written."""
    if "\x00" in value:
        raise UsaeError(f"the {what} contains a NUL character, which cannot be stored")
    return value
