"""Security headers on every response: what the browser may load, and who may frame the pages.

Pages load scripts, styles and images only from this site (htmx and app.js are files under
/static), so the policy can forbid inline scripts; inline `style` attributes and the style
element htmx adds stay allowed. No page may be framed (clickjacking of label, share and revoke
forms), and no page sends a Referer: a share link's URL is its token. /docs is the exception
for scripts: Swagger UI's page starts itself with one inline script.

Audit-link responses and the answers to writes (the page that shows a new link's token once)
are not stored by the browser (`Cache-Control: no-store`, unless the endpoint chose its own):
a revoked link's pages must not come back from history or the back/forward cache.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_POLICY = ("default-src 'self'; script-src 'self'{docs}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
           "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_COMMON = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
           (b"referrer-policy", b"no-referrer")]
PAGE_HEADERS = [(b"content-security-policy", _POLICY.format(docs="").encode()), *_COMMON]
API_DOCS_HEADERS = [(b"content-security-policy", _POLICY.format(docs=" 'unsafe-inline'").encode()), *_COMMON]
API_DOCS_PATH = "/docs"
SHARE_PREFIXES = ("/s/", "/api/s/")
NO_STORE = (b"cache-control", b"no-store")


class SecurityHeaders:
    """Pure ASGI (no per-request task or body buffering, unlike BaseHTTPMiddleware): adds the
    headers to each response start, leaving any the endpoint set itself."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        extra = API_DOCS_HEADERS if path == API_DOCS_PATH else PAGE_HEADERS
        if path.startswith(SHARE_PREFIXES) or scope["method"] not in ("GET", "HEAD"):
            extra = [*extra, NO_STORE]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                message["headers"] = headers + [(n, v) for n, v in extra if n not in present]
            await send(message)

        await self.app(scope, receive, send_with_headers)
