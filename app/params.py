"""Integers a request may carry in its path, form or body: ids, concept indices, versions.

They are compared with BIGINT columns. A number beyond what the database stores cannot match
anything, and binding it fails inside the driver (SQLite raises OverflowError, a 500), so such
requests are refused as invalid input (422) before any query runs.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Form, Path
from pydantic import Field

DB_INT_MAX = 2**63 - 1
"""The largest integer SQLite and Postgres (BIGINT) store."""

PathInt = Annotated[int, Path(ge=0, le=DB_INT_MAX)]
FormInt = Annotated[int, Form(ge=0, le=DB_INT_MAX)]
BodyInt = Annotated[int, Field(ge=0, le=DB_INT_MAX)]
