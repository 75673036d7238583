"""Integers a request may carry in its path, form or body: ids, concept indices, versions.

They are compared with BIGINT columns. A number beyond what the database stores cannot match
anything, and binding it fails inside the driver (SQLite raises OverflowError, a 500), so such
requests are refused as invalid input (422) before any query runs.
"""

from __future__ import annotations

from typing import Annotated, Any, Mapping, Sequence

from fastapi import Form, Path
from pydantic import Field

def readable_problems(errors: Sequence[Mapping[str, Any]]) -> str:
    """Validation errors as one sentence for people: "sort should be 'energy' or 'index'; page
    should be greater than or equal to 1", not pydantic's "Input should be ..., unable to parse"."""
    parts = []
    for e in errors:
        field = str(e["loc"][-1]) if e.get("loc") else "the input"
        message = str(e["msg"]).split(", unable to")[0]
        message = message.replace("Input should", "should", 1) if message.startswith("Input should") else message
        parts.append(f"{field} {message[0].lower()}{message[1:]}" if message.startswith("should")
                     else f"{field}: {message}")
    return "; ".join(parts)


DB_INT_MAX = 2**63 - 1
"""The largest integer SQLite and Postgres (BIGINT) store."""

PathInt = Annotated[int, Path(ge=0, le=DB_INT_MAX)]
FormInt = Annotated[int, Form(ge=0, le=DB_INT_MAX)]
BodyInt = Annotated[int, Field(ge=0, le=DB_INT_MAX)]
