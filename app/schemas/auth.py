"""Accounts."""

from __future__ import annotations

from pydantic import BaseModel


class LoginBody(BaseModel):
    username: str
    password: str


class Me(BaseModel):
    id: int
    username: str


class CsrfToken(BaseModel):
    csrf_token: str
