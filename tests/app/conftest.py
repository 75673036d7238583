"""The web tests' fixtures (defined in tests/app/webapp.py), registered once for this folder so
the session-scoped seeded template is built once, not once per module."""

from tests.app.webapp import reader, seeded, seeded_template, web, web_client  # noqa: F401
