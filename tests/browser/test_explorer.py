"""The explorer in a real browser, along the paths analysts and managers take."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections import deque
from pathlib import Path
from urllib.parse import urljoin, urlparse

import pytest

from app.templating import _percent
from tests.browser.conftest import LAPTOP, images_all_loaded, record_backbone, screenshot, sign_in

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_log_in_browse_and_filter(new_context, site):
    page = new_context().new_page()
    sign_in(page, site)
    page.click("text=planted")
    page.wait_for_url(f"**/runs/{site.run_id}")
    assert page.locator("svg.chart").count() >= 3
    page.click("nav.tabs >> text=Concepts")
    live = page.locator("#concept-grid .card").count()
    assert 0 < live <= site.n_concepts
    page.fill("#min_entropy", "0.8")
    page.select_option("#sort", "index")
    page.click("button:has-text('Apply')")
    page.wait_for_url(re.compile(r".*min_entropy=0.8.*"))
    assert "sort=index" in page.url
    assert page.url.split("?")[1] == "sort=index&min_entropy=0.8"  # only the fields in use
    page.go_back()
    page.wait_for_url(re.compile(r".*/concepts$"))
    assert page.locator("#q").is_enabled() and page.locator("#max_entropy").is_enabled()
    page.go_forward()
    page.wait_for_url(re.compile(r".*min_entropy=0.8.*"))
    universal = [int(i) for i in page.locator("#concept-grid .card").evaluate_all(
        "cards => cards.map(c => c.dataset.concept)")]
    assert universal == sorted(universal) and site.concept in universal and len(universal) <= live
    page.reload()  # the URL alone restores the view
    assert page.locator("#min_entropy").input_value() == "0.8"
    assert page.locator("#concept-grid .card").count() == len(universal)
    # Firing bars (stored with the card rows, scaled in CSS): the page's most frequent model
    # fills its track, every bar is its frequency's part of that.
    bars = page.locator("#concept-grid .fire-bar").evaluate_all("""bars => bars.map(b => [
        b.querySelector('.fill').getBoundingClientRect().width / b.querySelector('.track').getBoundingClientRect().width,
        parseFloat(getComputedStyle(b.querySelector('.fill')).getPropertyValue('--f'))])""")
    top = max(f for _, f in bars)
    assert top > 0 and all(abs(ratio - f / top) < 0.02 for ratio, f in bars)


def test_download_the_filtered_concepts_as_csv(new_context, analyst_state, site):
    """The browser's Download CSV button saves the view's concepts (its filters, every page) as
    a file a spreadsheet opens."""
    page = new_context(storage_state=analyst_state).new_page()
    page.goto(f"{site.base}/runs/{site.run_id}/concepts?min_entropy=0.8&sort=index")
    shown = [int(i) for i in page.locator("#concept-grid .card").evaluate_all("cards => cards.map(c => c.dataset.concept)")]
    with page.expect_download() as download:
        page.click("#download-csv")
    assert download.value.suggested_filename == "planted-concepts.csv"
    text = Path(download.value.path()).read_text(encoding="utf-8-sig")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [int(r["concept"]) for r in rows] == shown and shown
    assert all(r["status"] == "universal" and float(r["firing entropy"]) >= 0.8 for r in rows)


def test_a_page_of_cards_fills_whole_rows(new_context, analyst_state, site):
    """The browser's page size is a multiple of the card grid's columns at every width, from a
    phone to a projector, so the last row of a full page is never a lone card (36 cards at
    the five columns of a 1366 px laptop left one)."""
    per_page = new_context(storage_state=analyst_state).request.get(
        f"{site.base}/api/runs/{site.run_id}/concepts").json()["filters"]["per_page"]
    for width in (390, 700, 1024, 1280, 1366, 1600, 1920, 2560):
        page = new_context({"width": width, "height": 900}, analyst_state).new_page()
        page.goto(f"{site.base}/runs/{site.run_id}/concepts")
        columns = page.locator("#concept-grid").evaluate("g => getComputedStyle(g).gridTemplateColumns.split(' ').length")
        assert per_page % columns == 0, (width, columns, per_page)


def test_concept_page_shows_every_models_images(analyst, site):
    page = analyst
    page.goto(f"{site.base}/runs/{site.run_id}/concepts/{site.concept}")
    for model in site.models:
        column = page.locator(f"section[data-model='{model}']")
        assert column.locator(".top-images img").count() >= 3, model
    assert images_all_loaded(page) == []
    first = page.locator(f"section[data-model='{site.models[0]}'] .top-images a").first
    first.click()
    box = page.locator(".lightbox:target")
    assert box.is_visible()
    # the enlarged view: the image's thumbnail with the concept's heat layer over it
    widths = box.locator("img").evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
    assert len(widths) == 2 and min(widths) > 0
    # The arrow keys step through the model's images, Escape closes: no history entry for either,
    # so Back leaves the page instead of reopening images.
    opened_at = page.evaluate("history.length")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("location.hash") == f"#zoom-1-{site.models[0]}" and box.is_visible()
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")  # the first image has none before it
    assert page.evaluate("location.hash") == f"#zoom-0-{site.models[0]}"
    page.keyboard.press("Escape")
    assert page.locator(".lightbox:target").count() == 0 and page.evaluate("history.length") == opened_at
    assert "#" not in page.url  # the address a user copies now is the page's, not "#closed"
    # Keyboard users carry on from the thumbnail they opened, not from the top of the page.
    page.wait_for_function("() => document.activeElement.matches('.top-images a')")
    assert first.evaluate("a => a === document.activeElement")


def test_arrow_keys_step_through_concepts_but_not_while_typing(analyst, site):
    page = analyst
    here = f"{site.base}/runs/{site.run_id}/concepts/{site.concept}"
    page.goto(here)
    following = page.locator("a[rel=next]").get_attribute("href")
    page.locator("#label-form input[name=label]").click()
    page.keyboard.press("ArrowRight")  # moves the caret, not the page
    page.wait_for_timeout(300)
    assert page.url == here
    page.locator("#label-form input[name=label]").fill("half-typed name")
    page.locator("h1").click()
    page.keyboard.press("ArrowRight")  # a label being written is never left behind
    page.wait_for_timeout(300)
    assert page.url == here
    page.reload()
    page.locator("h1").click()
    page.keyboard.press("ArrowRight")
    page.wait_for_url(f"{site.base}{following}")
    page.keyboard.press("ArrowLeft")
    page.wait_for_url(here)
    # On the browser, the same keys turn its pages.
    page.goto(f"{site.base}/runs/{site.run_id}/concepts?per_page=24")
    page.locator("h1").click()
    page.keyboard.press("ArrowRight")
    page.wait_for_url("**page=2**")


def test_start_and_cancel_a_cam_job(analyst, site):
    """The CAM panel: refused while no model records its backbone; then start a job, watch it
    wait for a worker (none runs here), cancel it."""
    page = analyst
    page.goto(f"{site.base}/runs/{site.run_id}/concepts/{site.concept}")
    panel = page.locator("#cam-panel")  # loaded by htmx after the page
    page.wait_for_selector("#cam-unavailable")  # the planted store was imported: no network to optimise
    assert panel.locator("button").count() == 0 and "usae extract" in panel.inner_text()
    assert "Make one" not in page.locator(".cam-slot").first.inner_text()
    screenshot(page, "concept-cam-unavailable")
    record_backbone(site, site.models[0])
    page.reload()
    panel.locator("select[name=steps]").select_option("64")
    panel.locator("button:has-text('Make CAM images')").click()
    page.wait_for_selector("#cam-panel progress")
    assert "queued" in panel.inner_text() and "starts when the job worker is free" in panel.inner_text()
    screenshot(page, "concept-cam-queued")
    panel.locator("button:has-text('Cancel')").click()
    page.wait_for_url(re.compile(rf".*/concepts/{site.concept}#cam$"))
    page.wait_for_selector("#cam-panel:has-text('was cancelled')")
    page.goto(f"{site.base}/jobs")
    row = page.locator("#jobs tbody tr").first
    assert "cancelled" in row.inner_text() and f"concept {site.concept}" in row.inner_text()
    screenshot(page, "jobs")

    # /jobs follows a queued job by itself: cancel one through the API, the open page updates.
    token = page.request.get(f"{site.base}/api/auth/csrf").json()["csrf_token"]
    job = page.request.post(f"{site.base}/api/runs/{site.run_id}/concepts/{site.concept}/cam",
                            headers={"X-CSRF-Token": token}, data={"steps": 16}).json()
    page.goto(f"{site.base}/jobs")
    assert "queued" in page.locator(f"tr[data-job='{job['id']}']").inner_text()
    page.request.post(f"{site.base}/api/jobs/{job['id']}/cancel", headers={"X-CSRF-Token": token})
    page.wait_for_selector(f"tr[data-job='{job['id']}']:has-text('cancelled')", timeout=10_000)


def test_label_a_concept_and_see_it_in_history(analyst, site):
    page = analyst
    page.goto(f"{site.base}/runs/{site.run_id}/concepts/{site.concept}")
    page.fill("#label-input", "Planted streak")
    page.fill("#description-input", "Fires on the planted corner of three images")
    page.fill("#tags-input", "planted, test")
    page.click("button:has-text('Save label')")
    page.wait_for_selector("#label-notice:has-text('Label saved.')")  # htmx swapped the panel in
    assert page.locator("#label-name").inner_text() == "Planted streak"
    # The heading and the tab title name the concept too: they follow the save, not the old page.
    assert page.locator("h1").inner_text() == f"Planted streak #{site.concept}"
    assert page.title().startswith("Planted streak · ")
    # Focus stays on the Save button the panel was swapped around (keyboard users keep their place).
    assert page.evaluate("document.activeElement.id") == "label-save"
    assert "Planted streak" in page.locator("#label-history li").first.inner_text()
    page.reload()
    assert page.locator("#label-history li").first.inner_text().startswith("alice")
    page.goto(f"{site.base}/runs/{site.run_id}/concepts?tag=planted")
    assert page.locator("#concept-grid .card").count() == 1


def test_share_link_read_only_then_revoked(analyst, new_context, watch, site):
    page = analyst
    page.goto(f"{site.base}/runs/{site.run_id}/concepts/{site.concept}")
    page.fill("#label-input", "Shared corner")
    page.click("button:has-text('Save label')")
    page.wait_for_selector("#label-notice")
    page.click(".prevnext >> text=Share")
    assert page.locator("#concepts").input_value() == str(site.concept)
    page.fill("#note", "For the quality review")
    page.click("button:has-text('Create link')")
    url = page.locator("#share-url").input_value()
    assert url.startswith(site.base + "/s/")

    manager = new_context().new_page()  # no account, no cookies
    manager.goto(url)
    assert "Shared corner" in manager.locator("main").inner_text()
    assert "For the quality review" in manager.locator(".share-banner").inner_text()
    manager.click(f"[data-concept='{site.concept}']")
    assert manager.locator("#label-name").inner_text() == "Shared corner"
    assert manager.locator("#label-form").count() == 0
    assert images_all_loaded(manager) == []
    # Refused an edit, even by hand-made requests.
    refused = manager.request.post(f"{site.base}/runs/{site.run_id}/concepts/{site.concept}/label",
                                   form={"label": "Hijacked", "version": "3"}, max_redirects=0)
    assert refused.status == 303 and refused.headers["location"].startswith("/login")
    watch.expected_statuses.add(404)
    assert manager.request.get(url.replace(f"/runs/{site.run_id}/concepts", "") + "/shares").status == 404

    page.goto(f"{site.base}/shares")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("tr[data-status='active'] button:has-text('Revoke')")
    page.wait_for_selector("tr[data-status='revoked']")

    watch.expected_statuses.add(410)
    response = manager.goto(url)
    assert response.status == 410
    assert "This audit link was revoked" in manager.locator("main").inner_text()


def test_a_link_holder_on_a_phone_meets_the_images_before_the_reading_guide(analyst, new_context, site):
    page = analyst
    page.goto(f"{site.base}/shares")
    page.fill("#concepts", str(site.concept))
    page.click("button:has-text('Create link')")
    url = page.locator("#share-url").input_value()
    for width, folded in ((390, True), (1366, False)):
        holder = new_context({"width": width, "height": 844}).new_page()
        holder.goto(url)
        holder.click(f"[data-concept='{site.concept}']")
        guide = holder.locator("#reading-guide")
        assert guide.evaluate("d => d.open") is (not folded), width
        if folded:  # the first images on the first screen, the guide one tap away
            assert holder.locator(".top-images img").first.bounding_box()["y"] < 844
            guide.locator("summary").click()
            assert guide.evaluate("d => d.open") and "Firing entropy" in guide.inner_text()
        screenshot(holder, f"holder-concept-{width}")


def test_typing_concept_numbers_shares_only_those(analyst, site):
    """On the audit-link form reached from the menu ("the whole run" chosen), typing concept
    numbers chooses "only these concepts": the link is for those two, not the run."""
    page = analyst
    page.goto(f"{site.base}/shares")
    assert page.locator("input[name=scope][value=run]").is_checked()
    page.fill("#concepts", f"{site.concept}, 0")
    assert page.locator("#scope-concepts").is_checked()
    page.click("button:has-text('Create link')")
    assert "can read 2 concepts of" in page.locator("main").inner_text()


def test_the_expiry_day_is_named_in_words_as_it_is_picked(analyst, site):
    """The date field shows the browser's locale (01/04/2027); the line under it follows the
    picked day in words, and names the default day for a cleared field."""
    page = analyst
    page.goto(f"{site.base}/shares")
    words = page.locator("#expires-in-words")
    assert words.inner_text().startswith("Works through ")
    page.fill("#expires_on", "2027-01-04")
    assert words.inner_text() == "Works through Mon 04 Jan 2027, 23:59 UTC."
    page.fill("#expires_on", "")  # left empty, a link gets the default 30 days
    default = dt.datetime.now(dt.timezone.utc).date() + dt.timedelta(days=30)
    assert words.inner_text() == f"Works through {default:%a %d %b %Y}, 23:59 UTC."


def test_label_html_renders_escaped(analyst, site):
    page = analyst
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    evil = '<img src=x onerror="alert(1)"><b>bold</b>'
    page.goto(f"{site.base}/runs/{site.run_id}/concepts/0")
    page.fill("#label-input", evil)
    page.click("button:has-text('Save label')")
    page.wait_for_selector("#label-notice")
    page.reload()
    assert page.locator("#label-name").inner_text() == evil
    assert page.locator("#label-name img, #label-name b").count() == 0
    page.goto(f"{site.base}/runs/{site.run_id}/concepts?sort=index")
    assert page.locator(".card img[src='x'], .card .title b").count() == 0
    assert dialogs == []


def test_path_traversal_for_an_image_is_404(analyst, watch, site):
    watch.expected_statuses.add(404)
    for path in ("/media/..%2F..%2Fusae.db", "/media/%2e%2e/%2e%2e/secret_key", "/media/..%2Fusae.db"):
        response = analyst.request.get(site.base + path)
        assert response.status == 404 and b"SQLite" not in response.body()


def test_no_page_is_broken(analyst, new_context, site):
    """Crawl every page reachable from the runs list (and a shared view): no 4xx/5xx, no broken
    image, no console error (the watcher fails the test on any)."""
    page = analyst
    # Some state to render: a label and an audit link.
    page.goto(f"{site.base}/runs/{site.run_id}/concepts/1")
    page.fill("#label-input", "Second concept")
    page.click("button:has-text('Save label')")
    page.wait_for_selector("#label-notice")
    page.goto(f"{site.base}/shares?run={site.run_id}")
    page.click("button:has-text('Create link')")
    share_url = page.locator("#share-url").input_value()

    seen = _crawl(page, site, site.base + "/runs", "analyst")
    assert any(u.endswith("/compare") for u in seen) and any(u.endswith("/explain") for u in seen)
    assert sum(re.search(r"/concepts/\d+$", u) is not None for u in seen) == site.n_concepts
    manager = new_context({"width": 1920, "height": 1080}).new_page()
    shared = _crawl(manager, site, share_url, "shared")
    assert all(urlparse(u).path.startswith(urlparse(share_url).path) for u in shared)


def _crawl(page, site, start: str, label: str, limit: int = 60) -> list[str]:
    """Breadth-first over same-site links, each path once (query variants of a page render the
    same template; the filter tests cover them)."""
    queue, seen = deque([start]), []
    while queue and len(seen) < limit:
        url = queue.popleft()
        if url in seen:
            continue
        seen.append(url)
        response = page.goto(url)
        assert response.status < 400, url
        assert images_all_loaded(page) == [], url
        screenshot(page, f"{label}-{len(seen):02d}")
        for href in page.eval_on_selector_all("a[href]", "links => links.map(a => a.getAttribute('href'))"):
            target = urljoin(page.url, href).split("#")[0].split("?")[0]
            path = urlparse(target).path
            if (target.startswith(site.base) and "/media/" not in path and path != "/docs" and not path.endswith(".csv")
                    and target not in seen and target not in queue):
                queue.append(target)
    return seen


def test_layout_fits_laptop_and_projector(new_context, analyst_state, site):
    """No horizontal scrolling at 1366x768 or 1920x1080 on the busiest pages, even with a
    label that is one very long word on every concept."""
    api = new_context(storage_state=analyst_state).request
    csrf = api.get(f"{site.base}/api/auth/csrf").json()["csrf_token"]
    for index in range(site.n_concepts):
        url = f"{site.base}/api/runs/{site.run_id}/concepts/{index}"
        version = api.get(url).json()["version"]
        r = api.put(url + "/label", data={"label": "Unbreakable" * 15, "version": version},
                    headers={"X-CSRF-Token": csrf})
        assert r.ok, r.text()
    for viewport in (LAPTOP, {"width": 1920, "height": 1080}):
        page = new_context(viewport, analyst_state).new_page()
        for path in (f"/runs/{site.run_id}", f"/runs/{site.run_id}/concepts", f"/runs/{site.run_id}/concepts/{site.concept}",
                     f"/runs/{site.run_id}/compare", "/shares", "/explain"):
            page.goto(site.base + path)
            overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, (viewport, path, overflow)
    # Beside those labels the comparison's numbers stay on one line ("0.3" over "1%" before), and
    # on a phone its tables fit their panels: the label is cut short, the numbers stay in view.
    for viewport in (LAPTOP, {"width": 390, "height": 844}):
        page = new_context(viewport, analyst_state).new_page()
        page.goto(f"{site.base}/runs/{site.run_id}/compare")
        tables = ", ".join(f"#{key} table" for key in ("shared", "unique-a", "unique-b"))
        # A model column holds the concept's strongest image beside the number: the number on one
        # line, level with its image rather than under it.
        lines = page.eval_on_selector_all(tables.replace("table", "td.num"), """tds => tds.map(td => {
            const number = td.querySelector('.pair-freq > span:last-child') || td;
            const range = document.createRange(); range.selectNodeContents(number);
            const image = td.querySelector('.heat.mini');
            if (image) {
                const a = image.getBoundingClientRect(), b = number.getBoundingClientRect();
                if (Math.abs((a.top + a.bottom) / 2 - (b.top + b.bottom) / 2) > 2) return 'not level';
            }
            return range.getClientRects().length; })""")
        assert lines and set(lines) == {1}, (viewport, lines)
        assert page.locator(tables.replace("table", ".heat.mini")).count() > 0
        # The widest frequency the pages print fits its column ("0.063%" spilt out, against its image).
        assert _percent(0.000012) == "0.0012%"
        spills = page.eval_on_selector_all(tables.replace("table", ".pair-freq > span:last-child"), """numbers => numbers.filter(number => {
            number.textContent = '0.0012%';
            const range = document.createRange(); range.selectNodeContents(number);
            const text = range.getBoundingClientRect(), box = number.getBoundingClientRect();
            return text.left < box.left - 0.5 || text.right > box.right + 0.5; }).length""")
        assert spills == 0, viewport
        assert page.eval_on_selector_all(tables, "ts => ts.filter(t => t.parentElement.scrollWidth > t.parentElement.clientWidth).length") == 0


def test_the_api_page_works_offline_from_this_origin(new_context, site):
    """/docs renders the API's operations with Swagger UI served from static/vendor: no request
    leaves the site (FastAPI's default page loads it from a CDN and stays blank offline)."""
    page = new_context().new_page()
    origins = []
    page.on("request", lambda r: origins.append(urlparse(r.url).netloc))
    page.goto(f"{site.base}/docs")
    page.wait_for_selector(".opblock", timeout=15_000)
    assert page.locator(".opblock").count() > 10
    assert page.title() == "USAE Concept Explorer: API"
    assert set(origins) == {urlparse(site.base).netloc}, set(origins)
    back = page.locator("a", has_text="← Back to the explorer")  # the way back to the pages
    assert back.is_visible() and back.get_attribute("href") == "/runs"


def test_every_navigation_link_shows_on_a_phone(new_context, analyst_state, site):
    """The site's navigation and a run's tabs wrap on phones, down to 320 px: every link on
    screen, and the page never scrolls sideways ("Compare models" used to hang off a 320 px
    screen and drag the whole page with it)."""
    for width in (320, 390):
        page = new_context({"width": width, "height": 844}, analyst_state).new_page()
        page.goto(f"{site.base}/runs/{site.run_id}")
        links = page.locator(".topbar nav a, nav.tabs a")
        assert links.count() >= 8
        for i in range(links.count()):
            box = links.nth(i).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, (links.nth(i).inner_text(), box)
        assert page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth") <= 0, width
        if width == 390:  # one row: the brand, every link and the account button (tests/browser/test_phone_layout.py)
            brand, account, nav = (page.locator(s).bounding_box() for s in (".brand", ".account-toggle", ".topbar nav"))
            middle = brand["y"] + brand["height"] / 2
            assert all(abs(b["y"] + b["height"] / 2 - middle) < 4 for b in (account, nav)), (brand, account, nav)
        screenshot(page, f"phone-nav-{width}")


def test_browser_filters_line_up_on_a_phone(new_context, analyst_state, site):
    """On a phone the browser's filters fold behind "More filters", which counts those in use (open
    while one was, they filled the first screen); open, they are two even columns (search across
    both), each control as wide as its column."""
    page = new_context({"width": 390, "height": 844}, analyst_state).new_page()
    page.goto(f"{site.base}/runs/{site.run_id}/concepts")
    # Folded first: the search and the buttons, then the cards, on the first screen.
    assert page.is_visible("#q") and page.is_hidden("#sort") and page.is_hidden("#show_dead")
    assert page.locator(".card").first.bounding_box()["y"] < 844
    assert page.inner_text("#more-filters") == "More filters"
    page.click("#more-filters")
    assert page.is_visible("#sort") and page.is_hidden("#more-filters")
    filtered = new_context({"width": 390, "height": 844}, analyst_state).new_page()
    filtered.goto(f"{site.base}/runs/{site.run_id}/concepts?min_entropy=0.5&sort=entropy&show_dead=1")
    assert filtered.is_hidden("#min_entropy") and filtered.inner_text("#more-filters") == "More filters (2 in use)"
    assert filtered.locator(".card").first.bounding_box()["y"] < 844
    controls = page.locator("#filters .field").evaluate_all("""fields => fields.map(f => {
        const box = f.querySelector('input, select').getBoundingClientRect(); return [Math.round(box.left), Math.round(box.right)]; })""")
    search, rest = controls[0], controls[1:]
    assert len(rest) >= 6 and len({tuple(c) for c in rest}) == 2, controls  # the same two columns, left and right
    assert search[0] == min(rest)[0] and search[1] == max(rest)[1] <= 390, controls


def test_an_upload_over_the_limit_is_refused_before_it_is_sent(analyst, site):
    """The explain form checks the file's size in the browser: the server would answer a body far
    over the limit with a bare 413."""
    analyst.goto(site.base + "/explain")
    limit = int(analyst.get_attribute("#image", "data-max-bytes"))
    sent = []
    analyst.on("request", lambda r: r.method == "POST" and sent.append(r.url))
    analyst.set_input_files("#image", files=[{"name": "huge.png", "mimeType": "image/png", "buffer": b"\0" * (limit + 1)}])
    message = analyst.eval_on_selector("#image", "i => i.validationMessage")
    assert "the limit is" in message and f"{(limit + 1) / 1e6:.1f} MB" in message
    analyst.click("#explain-form button[type=submit]")
    analyst.wait_for_timeout(300)
    assert sent == [] and analyst.url.endswith("/explain")
    analyst.set_input_files("#image", files=[{"name": "ok.png", "mimeType": "image/png", "buffer": b"\0" * 100}])
    assert analyst.eval_on_selector("#image", "i => i.validationMessage") == ""


def _explainable_run(site, run_dir) -> int:
    """A run whose one model is the real MobileNetV2 (weights ship with the package) with a USAE
    for it, so /explain runs end to end in the site's server."""
    import torch

    from app.db import session_factory
    from app.models import Concept, Run, RunModel
    from usae_core.backbones import create_backbone
    from usae_core.config import USAEConfig
    from usae_core.model import USAE

    torch.manual_seed(0)
    dim = create_backbone("mobilenet_v2").dim
    USAE(USAEConfig(model_dims={"mnet": dim}, n_concepts=16, k=4, encoder="linear")).save_pretrained(run_dir)
    with session_factory(site.db_url)() as session:
        run = Run(name="explainable", run_dir=str(run_dir), store_dir="", n_concepts=16, k=4, status="mined")
        run.models = [RunModel(position=0, name="mnet", family="torchvision", dim=dim, grid_h=7, grid_w=7,
                               info={"registry_name": "mobilenet_v2"})]
        session.add(run)
        session.flush()
        session.add_all(Concept(run_id=run.id, index=i, label="") for i in range(16))
        session.commit()
        return run.id


def test_explaining_says_it_is_busy_then_shows_a_heatmap_large(analyst, site, tmp_path):
    import io

    import numpy as np
    from PIL import Image

    run_id = _explainable_run(site, tmp_path / "run")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(buffer, "PNG")
    analyst.goto(site.base + "/explain")
    analyst.select_option("#run_id", str(run_id))
    analyst.set_input_files("#image", files=[{"name": "photo.png", "mimeType": "image/png", "buffer": buffer.getvalue()}])
    # Submit handlers run inside requestSubmit, so the button is read before the upload leaves.
    with analyst.expect_navigation(timeout=60_000):
        busy = analyst.evaluate("""() => { const b = document.getElementById('explain-submit');
            document.getElementById('explain-form').requestSubmit(b); return [b.disabled, b.textContent]; }""")
    assert busy == [True, "Explaining…"]
    analyst.wait_for_selector("#explanation .explain-heat")
    original = analyst.get_attribute("#explain-view", "src")
    heat = analyst.locator(".explain-heat").nth(1)
    heat.click()
    assert analyst.get_attribute("#explain-view", "src") == heat.get_attribute("src") != original
    caption = analyst.inner_text("#explain-view-caption")
    assert caption.startswith("Concept #") and "in mnet" in caption
    analyst.click("#explain-view-reset")
    assert analyst.get_attribute("#explain-view", "src") == original
    assert analyst.is_hidden("#explain-view-caption")


def test_charts_fit_a_phone_screen(new_context, analyst_state, site):
    """On a phone each chart is drawn whole within its panel (it used to scroll sideways, hiding the
    universal end of the entropy histogram and half of every scatter)."""
    page = new_context({"width": 390, "height": 844}, analyst_state).new_page()
    for path in (f"/runs/{site.run_id}", f"/runs/{site.run_id}/compare"):
        page.goto(site.base + path)
        spill = page.eval_on_selector_all("svg.chart:not(.compact)", """charts => charts.map(c => {
            const panel = c.closest('.panel').getBoundingClientRect(), box = c.getBoundingClientRect();
            return Math.round(box.right - panel.right); })""")
        assert spill and max(spill) <= 0, (path, spill)
    # A line chart's series key is page text: the page's own type size (drawn in the SVG it shrank
    # to about 7 px), each key on the screen, none running into another.
    page.goto(f"{site.base}/runs/{site.run_id}")
    keys = page.eval_on_selector_all(".series-key > span", """spans => spans.map(s => {
        const b = s.getBoundingClientRect();
        return [b.left, b.right, b.top, b.bottom, parseFloat(getComputedStyle(s).fontSize)]; })""")
    assert len(keys) >= 2 and all(size >= 12 and 0 <= left and right <= 390 for left, right, _, _, size in keys), keys
    assert not [(a, b) for i, a in enumerate(keys) for b in keys[i + 1:]
                if a[0] < b[1] - 0.5 and b[0] < a[1] - 0.5 and a[2] < b[3] - 0.5 and b[2] < a[3] - 0.5], keys


def test_keyboard_skips_the_navigation_and_the_plot_points(analyst, site):
    page = analyst
    page.goto(f"{site.base}/runs/{site.run_id}")
    page.keyboard.press("Tab")
    skip = page.locator(".skip-link")
    assert skip.evaluate("a => a === document.activeElement") and skip.is_visible()
    page.keyboard.press("Enter")
    assert page.evaluate("() => document.activeElement.id") == "main"
    # The scatter is one tab stop, not hundreds of points before the tables.
    points = page.locator("svg.chart-scatter a")
    assert points.count() > 1
    in_plot = []
    for _ in range(12):
        page.keyboard.press("Tab")
        in_plot.append(page.evaluate("() => !!document.activeElement.closest('svg')"))
    assert in_plot.count(True) == 1, in_plot
    page.keyboard.press("Shift+Tab")
    while not page.evaluate("() => !!document.activeElement.closest('svg')"):
        page.keyboard.press("Shift+Tab")
    # There the arrow keys move between points, each named under the plot, and Enter opens one.
    first = page.evaluate("() => document.activeElement.getAttribute('href')")
    caption = page.locator("svg.chart-scatter + .point-focus")
    assert caption.inner_text().startswith("#") and "energy" in caption.inner_text()
    page.keyboard.press("ArrowRight")
    second = page.evaluate("() => document.activeElement.getAttribute('href')")
    assert second != first and "/concepts/" in second
    assert page.url.endswith(f"/runs/{site.run_id}#main")  # stepped between points, not between pages
    assert caption.inner_text() == page.evaluate("() => document.activeElement.getAttribute('aria-label')")
    assert page.locator("svg.chart-scatter a[tabindex='0']").count() == 1  # still one tab stop
    page.keyboard.press("ArrowLeft")
    assert page.evaluate("() => document.activeElement.getAttribute('href')") == first
    page.keyboard.press("Enter")
    page.wait_for_url(f"**{first}")
