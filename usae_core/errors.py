"""Errors a user can act on. The CLI prints them as one line, without a traceback."""


class UsaeError(Exception):
    """Bad input or state, described in one actionable sentence."""
