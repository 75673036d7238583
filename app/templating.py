"""Jinja2 set-up (autoescape on for every template) and the one way pages are rendered."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import jinja2
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape
from starlette.requests import Request
from starlette.responses import HTMLResponse

from app import charts
from app.formatting import measure, short_name
from app.models import utcnow
from app.schemas.concepts import MAX_SEARCH
from app.security import csrf_token
from app.urls import Urls
from app.viewer import Viewer

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


def check_page_folders() -> None:
    """The pages, their assets and the concept cards a mine renders are read from the checkout's
    templates/ and static/, which an editable install (scripts/install.sh) keeps in place; a
    built package has neither. Commands that need them call this first."""
    from usae_core.errors import UsaeError

    missing = [str(d) for d in (TEMPLATES_DIR, STATIC_DIR) if not d.is_dir()]
    if missing:
        raise UsaeError(f"the explorer's page templates are not where it reads them ({', '.join(missing)} missing): "
                        "install USAE Concept Explorer from its source folder with `bash scripts/install.sh` "
                        "(an editable install, `pip install -e .`), not as a built package")


def _datetime(value: dt.datetime | None) -> str:
    return "" if value is None else value.astimezone(dt.timezone.utc).strftime("%d %b %Y, %H:%M UTC")


def _date(value: dt.datetime | None) -> str:
    return "" if value is None else value.astimezone(dt.timezone.utc).strftime("%d %b %Y")


def _day_in_words(iso_day: str) -> str:
    """'2027-01-04' -> 'Mon 04 Jan 2027': a date field shows the day in the browser's own format
    (01/04/2027 reads as 1 April in much of the world); "" for anything but an ISO date."""
    try:
        return dt.date.fromisoformat(iso_day).strftime("%a %d %b %Y")
    except (TypeError, ValueError):
        return ""


def _percent(value: float) -> str:
    """Firing frequencies span decades: 12%, 3.4%, 0.05%."""
    pct = 100 * value
    if pct == 0:
        return "0%"
    if round(pct, 1) >= 10:  # 9.96% is "10%", not "10.0%" beside "11%"
        return f"{pct:.0f}%"
    if float(f"{pct:.2g}") >= 1:
        return f"{pct:.1f}%"
    return f"{pct:#.2g}%"  # two digits, trailing zero kept: 0.40%, 0.46%


def _duration(seconds: float) -> str:
    """How long a job took: 42 s, 3 min 05 s, 2 h 04 min."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _number(value: float | int) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:,.3g}"


def _breakable(name: str) -> Markup:
    """An identifier (a model name) that may wrap after '_', '-' or '.' in a narrow column."""
    return Markup(re.sub(r"([_.-])", r"\1<wbr>", str(escape(name))))


def page_window(number: int, pages: int, radius: int = 2) -> list[int | None]:
    """Page numbers to offer: first, last and `radius` around the current one; None marks a gap."""
    shown = sorted({1, pages, *range(max(1, number - radius), min(pages, number + radius) + 1)})
    window: list[int | None] = []
    for n in shown:
        if window and n - window[-1] > 1:  # type: ignore[operator]
            window.append(None)
        window.append(n)
    return window


def stored_html(html: str, urls: Urls) -> Markup:
    """Markup rendered earlier with an analyst's media links (`/media/...`, the browser's card
    rows), with `urls`' links instead. Every value in it was escaped when it was rendered, so
    `src="/media/` occurs only where a template wrote it."""
    return Markup(html.replace('src="/media/', f'src="{urls.prefix}/media/') if urls.prefix else html)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,  # every template, whatever its extension
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,  # templates ship with the code: no file checks on every page
    )
    env.filters.update(datetime=_datetime, date=_date, day_in_words=_day_in_words, percent=_percent,
                       number=_number, measure=measure, short_name=short_name, breakable=_breakable,
                       duration=_duration)
    env.globals.update(charts=charts, page_window=page_window, stored_html=stored_html, max_search=MAX_SEARCH)
    return env


templates = Jinja2Templates(env=_environment())


def render(request: Request, viewer: Viewer, name: str, *, status_code: int = 200,
           **context: Any) -> HTMLResponse:
    """A page for `viewer`. Analysts get the session's CSRF token for forms and htmx requests;
    share-link holders get no session at all."""
    csrf = csrf_token(request) if viewer.share is None and not viewer.urls.prefix else None
    return templates.TemplateResponse(
        request, name, {"viewer": viewer, "urls": viewer.urls, "csrf": csrf, "now": utcnow(), "nav": None, **context},
        status_code=status_code,
    )
