"""The top bar and the charts on phones, measured as Chromium draws them: the bar kept to one row
(two below 375 px), and chart text legible and clear of other text at a phone's width, while
laptops keep the designed charts and bar."""

from __future__ import annotations

import pytest

from tests.browser.conftest import LAPTOP, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Every shown chart's text: its rendered size in CSS px (font size times the chart's scale) and box.
CHART_TEXT = """() => [...document.querySelectorAll('svg.chart')].filter(svg => svg.getBoundingClientRect().width > 0)
  .map(svg => {
    const box = svg.getBoundingClientRect(), scale = svg.getScreenCTM().a;
    const texts = [...svg.querySelectorAll('text')].filter(t => t.getBoundingClientRect().width > 0 && t.textContent.trim());
    return {chart: svg.getAttribute('class'), box: [box.left, box.right, box.top, box.bottom],
            texts: texts.map(t => { const b = t.getBoundingClientRect();
              return {text: t.textContent, px: parseFloat(getComputedStyle(t).fontSize) * scale,
                      box: [b.left, b.right, b.top, b.bottom]}; })};
  })"""


def _overlaps(texts: list[dict]) -> list[tuple[str, str]]:
    boxes = [(t["text"], t["box"]) for t in texts]
    return [(a, b) for i, (a, p) in enumerate(boxes) for b, q in boxes[i + 1:]
            if p[0] < q[1] - 0.5 and q[0] < p[1] - 0.5 and p[2] < q[3] - 0.5 and q[2] < p[3] - 0.5]


def _bar(page) -> dict:
    return page.evaluate("""() => Object.fromEntries(['.topbar', '.brand', '.topbar nav', '.account-toggle', '.topbar .user']
        .map(s => { const e = document.querySelector(s), b = e && e.getBoundingClientRect();
                    return [s, b && b.width ? {top: b.top, bottom: b.bottom, mid: (b.top + b.bottom) / 2} : null]; }))""")


def test_the_top_bar_takes_one_row_on_a_phone_and_two_at_320_px(new_context, analyst_state, site):
    """It took three rows at 320 and 360 px (121 px high: the links wrapped under the brand, the name
    and Sign out) and two at 390 (86 px). The name and Sign out now fold behind an account button."""
    heights = {}
    for width in (320, 360, 375, 390):
        page = new_context({"width": width, "height": 844}, analyst_state).new_page()
        page.goto(f"{site.base}/runs/{site.run_id}")
        bar = _bar(page)
        heights[width] = bar[".topbar"]["bottom"] - bar[".topbar"]["top"]
        assert bar[".topbar .user"] is None  # folded into the account button
        brand, nav, toggle = bar[".brand"], bar[".topbar nav"], bar[".account-toggle"]
        if width >= 375:  # one row: the brand, every link and the account button side by side
            assert heights[width] < 56 and abs(nav["mid"] - brand["mid"]) < 4 and abs(toggle["mid"] - brand["mid"]) < 4, bar
        else:  # two rows: the brand and the account button, then every link
            assert heights[width] < 90 and abs(toggle["mid"] - brand["mid"]) < 4 and nav["top"] >= brand["bottom"], bar
        links = page.locator(".topbar nav a")
        for i in range(links.count()):
            box = links.nth(i).bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= width and box["y"] + box["height"] <= heights[width]
        screenshot(page, f"phone-top-bar-{width}")
    # The account button opens the name and Sign out over the page; a tap elsewhere closes them.
    page.click(".account-toggle")
    assert page.is_visible(".topbar .user >> text=Signed in as") and page.is_visible(".topbar .user button:has-text('Sign out')")
    page.mouse.click(20, 600)
    assert page.is_hidden(".topbar .user")
    # (Not pressed: signing out ends every session of the analyst, the other tests' too.)
    assert page.eval_on_selector(".topbar .user button", "b => b.type === 'submit' && b.form.action.endsWith('/logout')")
    # A laptop keeps the one-row bar with the name and Sign out in it, and no account button.
    laptop = new_context(LAPTOP, analyst_state).new_page()
    laptop.goto(f"{site.base}/runs/{site.run_id}")
    bar = _bar(laptop)
    assert bar[".account-toggle"] is None and bar[".topbar .user"] is not None
    assert bar[".topbar"]["bottom"] - bar[".topbar"]["top"] < 56 and abs(bar[".topbar .user"]["mid"] - bar[".brand"]["mid"]) < 4
    assert laptop.is_visible(".topbar .user >> text=Signed in as")


def test_chart_text_reads_on_a_phone_and_runs_into_no_other_text(new_context, analyst_state, site):
    """Charts shrink to a phone's width, and so did their text (to 6 or 7 px); drawn larger in the
    designed margins, axis labels ran into each other. Each chart now has a phone layout: its text
    at 11 px or more (at 390 px; 9.5 or more at 320) in margins made for it, every label apart from
    the others and inside the chart."""
    pages = (f"/runs/{site.run_id}", f"/runs/{site.run_id}/compare", f"/runs/{site.run_id}/concepts/{site.concept}")
    for width, least in ((390, 11.0), (320, 9.5)):
        page = new_context({"width": width, "height": 844}, analyst_state).new_page()
        for path in pages:
            page.goto(site.base + path)
            charts = page.evaluate(CHART_TEXT)
            kinds = {c["chart"].split()[1] for c in charts}
            assert kinds >= ({"chart-heatmap", "chart-histogram", "chart-scatter", "chart-lines"} if path == pages[0]
                             else {"chart-scatter"} if path == pages[1] else {"chart-histogram"}), (path, kinds)
            for chart in charts:
                texts, (left, right, top, bottom) = chart["texts"], chart["box"]
                assert texts, chart["chart"]
                small = [(t["text"], round(t["px"], 1)) for t in texts if t["px"] < least]
                assert not small, (width, path, chart["chart"], small)
                assert not _overlaps(texts), (width, path, chart["chart"], _overlaps(texts))
                outside = [t["text"] for t in texts if t["box"][0] < left - 1 or t["box"][1] > right + 1
                           or t["box"][2] < top - 1 or t["box"][3] > bottom + 1]
                assert not outside, (width, path, chart["chart"], outside)
                assert 0 <= left and right <= width, (width, path, chart["chart"], chart["box"])
            screenshot(page, f"phone-charts-{width}-{path.rsplit('/', 1)[-1]}")
    # A laptop shows the charts as designed: their text at its designed 11 px, no phone layout.
    laptop = new_context(LAPTOP, analyst_state).new_page()
    laptop.goto(f"{site.base}/runs/{site.run_id}/compare")
    (scatter,) = laptop.evaluate(CHART_TEXT)
    assert {round(t["px"], 1) for t in scatter["texts"]} <= {11.0, 12.0} and not _overlaps(scatter["texts"])
    assert laptop.locator("svg.chart .axes-phone").first.is_hidden()
    assert laptop.eval_on_selector("svg.chart .plot", "g => getComputedStyle(g).transform") == "none"
