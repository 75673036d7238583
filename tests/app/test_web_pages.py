"""Pages and their JSON counterparts show what the data database holds."""

from __future__ import annotations

import html
import math
import re

import pytest
from fastapi.testclient import TestClient

from sqlalchemy import select

from app.db import session_factory
from app.models import Concept, ConceptDefectIoU, Run, RunModel
from tests.app.seed import DEFECTS
from tests.app.webapp import PASSWORD, csrf_from, login, sign_in_as  # noqa: F401


def _indices(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'data-concept="(\d+)"', html)]


@pytest.fixture
def client(reader):
    return reader[0]


@pytest.fixture
def data(reader):
    return reader[1]


def test_pages_need_login(client):
    web = TestClient(client.app)  # same app, no session
    r = web.get("/runs/1/concepts?sort=index", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/login?next=%2Fruns%2F1%2Fconcepts%3Fsort%3Dindex"
    assert web.get("/api/runs").status_code == 401
    assert web.get("/api/runs/1/concepts/0").status_code == 401


def test_runs_list_and_overview(client, data):
    r = client.get("/runs")
    assert r.status_code == 200
    assert "demo-run" in r.text and "other-run" in r.text and "vit_s" in r.text
    r = client.get(f"/runs/{data.run.run_id}")
    assert r.status_code == 200

    def count(key: str) -> int:
        return int(re.search(rf'id="count-{key}">([\d,]+)<', r.text).group(1))

    assert count("dead") == len(data.run.dead)
    assert count("universal") == len(data.run.universal)
    assert count("specific") == len(data.run.only_first)
    # Each count opens the browser on exactly the concepts it counts.
    specific = html.unescape(re.search(r'<a class="stat" href="([^"]+)">\s*<div class="label">Model-specific',
                                       r.text).group(1))
    assert sorted(_indices(client.get(specific + "&per_page=200").text)) == sorted(data.run.only_first)
    dead = html.unescape(re.search(r'<a class="stat" href="([^"]+)">\s*<div class="label">Dead concepts',
                                   r.text).group(1))
    assert _indices(client.get(dead + "&per_page=200").text) == sorted(data.run.dead)
    assert r.text.count("<svg") >= 3  # R² heatmap, entropy histogram, co-fire scatter
    # The page in one sentence, with the same counts, for whoever does not read the charts.
    summary = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", r.text[r.text.index('id="summary"'):].split("</p>")[0]))
    live = len(data.run.universal) + len(data.run.only_first)
    assert (f"of the {live} concepts these {len(data.run.models)} models use, {len(data.run.universal)} are used by "
            f"all of them about equally and {len(data.run.only_first)} mostly by one or some of them") in summary
    assert '<details class="reading-guide" id="reading-guide">' in r.text  # folded
    defects = r.text[r.text.index('id="defects"'):]
    assert all(d in defects for d in DEFECTS)


def test_overview_api_matches_the_seed(client, data):
    body = client.get(f"/api/runs/{data.run.run_id}").json()
    assert body["n_dead"] == len(data.run.dead)
    assert body["n_universal"] == len(data.run.universal)
    assert body["r2"][0][1] == pytest.approx(0.65) and body["r2"][1][0] == pytest.approx(0.65)
    assert sum(body["entropy_histogram"]["counts"]) == data.run.n_concepts - len(data.run.dead)
    # seed: concept c has IoU 0.2 + 0.1 c for defect c % 2, so the best are concepts 2 and 3
    best = {d["defect_type"]: d["concept"]["index"] for d in body["best_per_defect"]}
    assert best == {"crack": 2, "scratch": 3}
    # Each with the concept's strongest image in the model of that overlap.
    for d in body["best_per_defect"]:
        assert d["image"]["rank"] == 0 and d["image"]["model"] == d["model"]
        assert d["image"]["heatmap"].endswith(f"/heatmaps/{d['concept']['index']}/{d['model']}-0.png")
    page = client.get(f"/runs/{data.run.run_id}").text
    defects = page[page.index('id="defects"'):page.index("</table>", page.index('id="defects"'))]
    assert defects.count('class="heat mini"') == 2


def test_the_defect_table_names_each_models_own_best_concept(web_client, seeded):
    client, run = web_client, seeded.run
    with session_factory(seeded.settings.db_url)() as session:  # a second model overlaps cracks too, better
        gen = session.scalar(select(Run.active_generation_id).where(Run.id == run.run_id))
        models = dict(session.execute(select(RunModel.name, RunModel.id).where(RunModel.run_id == run.run_id)).all())
        concepts = dict(session.execute(select(Concept.index, Concept.id).where(Concept.run_id == run.run_id)).all())
        session.add_all([ConceptDefectIoU(generation_id=gen, concept_id=concepts[c], run_model_id=models[run.models[1]],
                                          defect_type="crack", iou=0.9) for c in (7, 5)])
        session.add(ConceptDefectIoU(generation_id=gen, concept_id=concepts[6], run_model_id=models[run.models[1]],
                                     defect_type="crack", iou=0.3))
        session.commit()
    body = {d["defect_type"]: d for d in client.get(f"/api/runs/{run.run_id}").json()["best_per_defect"]}
    crack = body["crack"]
    assert (crack["concept"]["index"], crack["model"], crack["iou"]) == (5, run.models[1], 0.9)  # a tie: the lower
    assert [(c["model"], c["concept"]["index"], c["iou"]) for c in crack["by_model"]] == [
        (run.models[0], 2, pytest.approx(0.4)), (run.models[1], 5, 0.9)]  # in the run's model order
    assert all(c["image"]["model"] == c["model"] for c in crack["by_model"])
    assert [c["model"] for c in body["scratch"]["by_model"]] == [run.models[0]]  # none overlaps in the others
    page = client.get(f"/runs/{run.run_id}").text
    table = page[page.index('id="defects"'):page.index("</table>", page.index('id="defects"'))]
    row = table[table.index("<strong>crack</strong>"):].split("</tr>")[0]
    cells = re.findall(r'<td data-label="([^"]+)" class="defect-cell( best)?">(.*?)</td>', row, re.S)
    assert [(m, bool(best)) for m, best, _ in cells] == [(m, m == run.models[1]) for m in run.models]
    assert f'/concepts/2">#2' in cells[0][2] and f'/concepts/5">#5' in cells[1][2] and "IoU <b>0.900</b>" in cells[1][2]
    assert all("no concept overlaps it" in cell for _, _, cell in cells[2:])


def test_browser_hides_dead_and_sorts_by_energy(client, data):
    html = client.get(f"/runs/{data.run.run_id}/concepts").text
    shown = _indices(html)
    live = [c for c in range(data.run.n_concepts) if c not in data.run.dead]
    assert sorted(shown) == live
    energies = [float(e) for e in re.findall(r"energy <b>([\d.e+-]+)</b>", html)]
    assert energies == sorted(energies, reverse=True)
    with_dead = _indices(client.get(f"/runs/{data.run.run_id}/concepts?show_dead=1&sort=index").text)
    assert with_dead == list(range(data.run.n_concepts))
    only_dead = client.get(f"/runs/{data.run.run_id}/concepts?show_dead=only&sort=index")
    assert _indices(only_dead.text) == sorted(data.run.dead)
    assert '<option value="only" selected>only these</option>' in only_dead.text
    assert "match the filters" in only_dead.text  # a narrowed view says so
    assert client.get(f"/runs/{data.run.run_id}/concepts?show_dead=bogus").status_code == 400


@pytest.mark.parametrize("query, expected", [
    ("min_entropy=0.8", "universal"),
    ("max_entropy=0.8", "not_universal"),
    ("mostly=vit_s&min_entropy=", "only_first"),
    ("labelled=unlabelled", "live"),
    ("labelled=labelled", "none"),
])
def test_browser_filters(client, data, query, expected):
    run = data.run
    live = [c for c in range(run.n_concepts) if c not in run.dead]
    want = {"universal": run.universal, "only_first": run.only_first, "none": [], "live": live,
            "not_universal": [c for c in live if c not in run.universal]}[expected]
    shown = _indices(client.get(f"/runs/{run.run_id}/concepts?{query}&per_page=200").text)
    assert sorted(shown) == sorted(want)


def test_browser_paginates_and_keeps_filters_in_links(client, data):
    run = data.run
    first = client.get(f"/runs/{run.run_id}/concepts?sort=index&per_page=10&min_entropy=0.5")
    assert _indices(first.text) == run.universal[:10]
    assert f'href="/runs/{run.run_id}/concepts?sort=index&amp;min_entropy=0.5&amp;page=2&amp;per_page=10"' in first.text
    second = client.get(f"/runs/{run.run_id}/concepts?sort=index&per_page=10&min_entropy=0.5&page=2")
    assert _indices(second.text) == run.universal[10:20]
    # A card is named by its label and number, not by the alt text of its thumbnails that comes first.
    names = re.findall(r'data-concept="(\d+)" aria-label="([^"]*)"', second.text)
    assert [int(i) for i, _ in names] == run.universal[10:20]
    assert all(name.endswith(f", concept #{i}") and not name.startswith(("#", ",")) for i, name in names)


def test_browser_page_past_the_end_says_so(client, data):
    """A page number beyond the last (an old bookmark) is not "no concept matches": it names the
    real count and links to the last page, keeping the filters."""
    run = data.run
    r = client.get(f"/runs/{run.run_id}/concepts?sort=index&per_page=10&page=99")
    assert r.status_code == 200 and _indices(r.text) == []
    pages = -(-(run.n_concepts - len(run.dead)) // 10)
    assert "No concept matches" not in r.text and "page 99 of" not in r.text
    assert "There is no page 99" in r.text and f"on {pages} pages" in r.text
    last = f"/runs/{run.run_id}/concepts?sort=index&amp;page={pages}&amp;per_page=10"
    assert f'href="{last}">Go to the last page' in r.text
    assert 'aria-label="Pages"' not in r.text  # no pager of pages that are not there


def test_browser_rejects_bad_filters_plainly(client, data):
    r = client.get(f"/runs/{data.run.run_id}/concepts?min_entropy=lots")
    assert r.status_code == 400 and "min_entropy" in r.text
    r = client.get(f"/runs/{data.run.run_id}/concepts?mostly=nosuchmodel")
    assert r.status_code == 400 and "nosuchmodel" in r.text
    # Search text is a few words: 500 characters are searched, more are refused, on the concept page too.
    assert client.get(f"/runs/{data.run.run_id}/concepts?q={'x' * 500}").status_code == 200
    for path in ("concepts", "concepts/0"):
        r = client.get(f"/runs/{data.run.run_id}/{path}?q={'x' * 501}")
        assert r.status_code == 400 and "at most 500 characters" in r.text, r.text[:300]


def _filter_form(text: str) -> str:
    start = text.index('id="filters"')
    return text[start:text.index("</form>", start)]


def test_browser_sorts_either_way_and_keeps_the_direction(client, data):
    """Every sort goes both ways (`order=asc|desc`); left out, each keeps its usual direction
    (statistics highest first, concept number lowest first), so old URLs show what they did."""
    run = data.run.run_id

    def entropies(text: str) -> list[float]:
        return [float(e) for e in re.findall(r"entropy <b>([\d.]+)</b>", text)]

    usual = client.get(f"/runs/{run}/concepts?sort=entropy&per_page=200")
    assert entropies(usual.text) == sorted(entropies(usual.text), reverse=True)
    lowest = client.get(f"/runs/{run}/concepts?sort=entropy&order=asc&per_page=200")
    assert lowest.status_code == 200
    assert entropies(lowest.text) == sorted(entropies(lowest.text)) and entropies(lowest.text)[0] < 0.8
    assert _indices(lowest.text) == _indices(usual.text)[::-1]
    assert _indices(client.get(f"/runs/{run}/concepts?sort=entropy&order=desc&per_page=200").text) == \
        _indices(usual.text)
    by_number = _indices(client.get(f"/runs/{run}/concepts?sort=index&order=desc&per_page=200").text)
    assert by_number == sorted(by_number, reverse=True)
    # The form names the direction; the usual one is the empty choice, so it stays out of the URL.
    form = _filter_form(lowest.text)
    assert '<select id="order" name="order"' in form
    assert re.search(r'<option value="asc"[^>]* selected>lowest first</option>', form)
    assert re.search(r'<option value=""[^>]*>highest first</option>', form)
    by_index = client.get(f"/runs/{run}/concepts?sort=index").text
    by_index_form = _filter_form(by_index)
    assert re.search(r'<option value=""[^>]* selected>lowest first</option>', by_index_form)
    assert re.search(r'<option value="desc"[^>]*>highest first</option>', by_index_form)
    # Kept by the pager, the cards' links, the CSV button; the usual direction is never spelt out.
    paged = client.get(f"/runs/{run}/concepts?sort=entropy&order=asc&per_page=5").text
    assert f'href="/runs/{run}/concepts?sort=entropy&amp;order=asc&amp;page=2&amp;per_page=5"' in paged
    first = _indices(paged)[0]
    assert f'href="/runs/{run}/concepts/{first}?sort=entropy&amp;order=asc&amp;per_page=5"' in paged
    assert f'href="/runs/{run}/concepts.csv?sort=entropy&amp;order=asc"' in paged
    spelt = client.get(f"/runs/{run}/concepts?sort=entropy&order=desc&per_page=5").text
    assert "order=desc" not in spelt and f'href="/runs/{run}/concepts?sort=entropy&amp;page=2&amp;per_page=5"' in spelt
    # The JSON API takes the same parameter.
    api = client.get(f"/api/runs/{run}/concepts", params={"sort": "entropy", "order": "asc", "per_page": 200})
    assert [c["index"] for c in api.json()["concepts"]] == _indices(lowest.text)
    assert api.json()["filters"]["order"] == "asc"
    # A wrong direction is a 400 naming it, on the page, the API, the CSV and the concept page.
    for path in ("/runs/{run}/concepts", "/api/runs/{run}/concepts", "/runs/{run}/concepts.csv",
                 "/runs/{run}/concepts/1"):
        r = client.get(path.format(run=run), params={"sort": "entropy", "order": "up"})
        assert r.status_code == 400 and "order should be 'asc' or 'desc'" in html.unescape(r.text), (path, r.text[:300])


def test_entropy_filters_take_any_threshold(client, data):
    """The entropy fields step by any amount: 0.82 is a threshold the browser's own check lets
    through (a step of 0.05 made it "nearest valid values are 0.8 and 0.85"), and the server too."""
    run = data.run.run_id
    page = client.get(f"/runs/{run}/concepts?min_entropy=0.82&max_entropy=0.97").text
    form = _filter_form(page)
    numbers = re.findall(r'<input type="number"[^>]*>', form)
    assert len(numbers) == 2 and all('step="any"' in n for n in numbers), numbers
    assert 'value="0.82"' in form and 'value="0.97"' in form
    body = client.get(f"/api/runs/{run}/concepts", params={"min_entropy": 0.823, "per_page": 200,
                                                           "show_dead": 1}).json()
    everything = client.get(f"/api/runs/{run}/concepts", params={"per_page": 200, "show_dead": 1}).json()
    assert body["total"] == sum(c["firing_entropy"] >= 0.823 for c in everything["concepts"])
    assert client.get(f"/runs/{run}/concepts?min_entropy=1.01").status_code == 400


def test_concept_page_shows_every_model(client, data):
    run = data.run
    html = client.get(f"/runs/{run.run_id}/concepts/0").text
    for model in run.models:
        column = html[html.index(f'data-model="{model}"'):]
        column = column[:column.index("</section>")]
        layers = re.findall(r'<img class="layer" src="([^"]+)"', column)
        assert len(layers) >= 4 and all(src.startswith(f"/media/{run.media_prefix}/heatmaps/0/{model}-") for src in layers[:4])
        thumbs = re.findall(r'<img src="([^"]+)"', column)  # each heat layer sits on its image's thumbnail
        assert len(thumbs) >= 4 and all(f"/media/{run.media_prefix}/thumbs/" in src for src in thumbs[:4])
        assert "<svg" in column  # activation histogram
    assert data.run.cam_path in html  # CAM slot filled for the first model
    assert html.count("No CAM image yet.") == len(run.models) - 1
    assert 'rel="next" href="/runs/1/concepts/1"' in html and 'rel="prev"' not in html
    assert '<details class="reading-guide" id="reading-guide">' in html  # folded for analysts
    assert 'href="/runs/1/concepts/1"' in html[html.index('id="neighbours"'):]  # nearest concepts
    assert "crack" in html[html.index('id="defect-iou"'):]


def test_enlarged_views_show_the_larger_square_where_mining_wrote_one(client, data):
    run = data.run
    html = client.get(f"/runs/{run.run_id}/concepts/0").text
    seen = set()
    for model in run.models:
        column = html[html.index(f'data-model="{model}"'):]
        column = column[:column.index("</section>")]
        thumbs = re.findall(r'<img src="/media/[^"]+/thumbs/(\d+)\.png"', column)
        for rank, image in enumerate(thumbs):
            box = html[html.index(f'id="zoom-{rank}-{model}"'):]
            enlarged = re.search(r'<img src="([^"]+)"', box[:box.index("</figure>")]).group(1)
            # the seed gives even images a view (a large source) and odd ones none (the thumbnail is enlarged)
            folder = "views" if int(image) % 2 == 0 else "thumbs"
            assert enlarged == f"/media/{run.media_prefix}/{folder}/{image}.png", (model, rank)
            assert client.get(enlarged).status_code == 200
            seen.add(folder)
    assert seen == {"views", "thumbs"}


def test_concept_api(client, data):
    body = client.get(f"/api/runs/{data.run.run_id}/concepts/1").json()
    assert body["card"]["mostly_in"] == ["vit_s"] and not body["card"]["universal"]
    columns = {c["model"]: c for c in body["columns"]}
    assert len(columns["vit_s"]["top_images"]) == 4 and columns["cnn_m"]["top_images"] == []
    assert [t["rank"] for t in columns["vit_s"]["top_images"]] == [0, 1, 2, 3]
    assert columns["vit_s"]["histogram_counts"] and len(columns["vit_s"]["histogram_edges"]) == \
        len(columns["vit_s"]["histogram_counts"]) + 1
    assert (body["prev_index"], body["next_index"]) == (0, 2)


def test_compare_page_and_api(client, data):
    run = data.run
    body = client.get(f"/api/runs/{run.run_id}/compare", params={"a": "vit_s", "b": "clip_b"}).json()
    assert body["r2_a_to_b"] == pytest.approx(0.70) and body["r2_b_to_a"] == pytest.approx(0.70)
    assert body["n_unique_a"] == len(run.only_first) and body["n_unique_b"] == 0
    assert {p["index"] for p in body["shared"]} <= set(run.universal)
    assert body["n_shared"] == len(run.universal)
    # Each point says which list it belongs to, by the lists' own rule (share of firing in A).
    for p in body["points"]:
        part_a = p["frequency_a"] / (p["frequency_a"] + p["frequency_b"])
        want = "shared" if 0.25 <= part_a <= 0.75 else "only_a" if part_a >= 0.9 else "only_b" if part_a <= 0.1 else ""
        assert p["group"] == want, p
    assert {p["group"] for p in body["points"] if p["index"] in run.only_first} == {"only_a"}
    # A listed concept carries its strongest image (rank 0) in each model where it has one.
    for p in body["shared"]:
        for side, model in (("image_a", "vit_s"), ("image_b", "clip_b")):
            assert p[side]["rank"] == 0 and p[side]["model"] == model
            assert p[side]["heatmap"].endswith(f"/heatmaps/{p['index']}/{model}-0.png"), p
    assert body["unique_a"] and all(p["image_a"] and p["image_b"] is None for p in body["unique_a"])
    assert all(p["image_a"] is None for p in body["points"])  # the scatter needs no images
    html = client.get(f"/runs/{run.run_id}/compare?a=cnn_m&b=vit_s").text
    assert 'id="r2-ab">0.650<' in html
    listed = client.get(f"/api/runs/{run.run_id}/compare", params={"a": "cnn_m", "b": "vit_s"}).json()
    shown = [p for key in ("shared", "unique_a", "unique_b") for p in listed[key]]
    for p in shown:
        for side in ("image_a", "image_b"):
            if p[side]:
                assert f'src="/media/{p[side]["heatmap"]}"' in html, p
    assert html.count('class="heat mini"') == sum(bool(p[s]) for p in shown for s in ("image_a", "image_b"))
    assert html.count('class="heat mini blank"') == sum(not p[s] for p in shown for s in ("image_a", "image_b"))
    assert re.search(rf'<a href="/runs/{run.run_id}/concepts/1" tabindex="-?\d" aria-label="#1 ', html)  # points link
    points = re.findall(r'<circle class="point ([a-z-]+)"', html)
    assert points and set(points) <= {"shared", "only-a", "only-b", "between"} and "shared" in points
    assert '<span class="swatch only-b"></span> only in vit_s' in html  # the legend names the colours
    # The same model in both menus: the page stays, says so and shows that model against another.
    same = client.get(f"/runs/{run.run_id}/compare?a=vit_s&b=vit_s")
    assert same.status_code == 200 and 'id="compare-notice"' in same.text and "both vit_s" in same.text
    assert '<option selected>vit_s</option>' in same.text.split('id="b"')[0]
    assert '<option selected>vit_s</option>' not in same.text.split('id="b"')[1].split("</select>")[0]
    assert client.get(f"/api/runs/{run.run_id}/compare", params={"a": "vit_s", "b": "vit_s"}).status_code == 400


def test_a_compare_list_longer_than_its_first_rows_can_be_shown_in_full(client, data, monkeypatch):
    from app.services import compare

    monkeypatch.setattr(compare, "LIST_LENGTH", 2)
    monkeypatch.setattr("app.routes.compare.LIST_LENGTH", 2)
    run = data.run
    url = f"/runs/{run.run_id}/compare?a=vit_s&b=clip_b"
    first = client.get(f"/api{url}").json()
    assert first["n_shared"] > 2 and len(first["shared"]) == 2 and first["shown_in_full"] is None
    html = client.get(url).text
    section = html[html.index('id="shared"'):html.index("</section>", html.index('id="shared"'))]
    escaped = url.replace("&", "&amp;")
    link = f'{escaped}&amp;show=shared#shared'
    assert f"the 2 most frequent of {first['n_shared']}" in section and f'href="{link}"' in section and ">show all<" in section
    full = client.get(f"/api{url}&show=shared").json()
    assert full["shown_in_full"] == "shared" and len(full["shared"]) == full["n_shared"]
    assert [p["index"] for p in full["shared"][:2]] == [p["index"] for p in first["shared"]]  # the same order, continued
    assert full["unique_a"] == first["unique_a"]  # the other lists stay short
    assert all(p["image_a"] and p["image_b"] for p in full["shared"])  # every row with its images
    html = client.get(f"{url}&show=shared").text
    section = html[html.index('id="shared"'):html.index("</section>", html.index('id="shared"'))]
    assert f"all {full['n_shared']}" in section and f'href="{escaped}#shared">show the 2 most frequent<' in section
    assert section.count("<tr>") == full["n_shared"] + 1  # and the header
    bad = client.get(f"{url}&show=everything")
    assert bad.status_code == 400 and "show must be one of shared, only_a, only_b" in bad.text


def test_missing_things_are_404(client, data):
    assert client.get("/runs/999").status_code == 404
    assert client.get(f"/runs/{data.run.run_id}/concepts/999").status_code == 404
    assert client.get("/api/runs/999/concepts").json()["detail"] == "No such run."
    r = client.get("/no/such/page")
    assert r.status_code == 404 and "Not found" in r.text


def test_overview_lists_labelled_concepts_with_each_models_firing(web_client, seeded):
    run = seeded.run
    headers = {"X-CSRF-Token": web_client.get("/api/auth/csrf").json()["csrf_token"]}
    # Nothing labelled yet: the panel says so, and how to change that (analysts) or what will show (holders).
    empty = web_client.get(f"/runs/{run.run_id}").text
    assert 'id="labelled-empty"' in empty and "Label" in empty.split('id="labelled-empty"')[1].split("</p>")[0]
    token = web_client.post("/api/shares", json={"run_id": run.run_id}, headers=headers).json()["token"]
    with TestClient(web_client.app) as holder:
        shared = holder.get(f"/s/{token}/runs/{run.run_id}").text
    empty_shared = shared.split('id="labelled-empty"')[1].split("</p>")[0]
    assert "Once the analysts name concepts" in empty_shared and "Label" not in empty_shared
    first = run.only_first[0]
    for index, label in ((run.universal[0], "Crack <edge>"), (first, "Stain")):
        r = web_client.put(f"/api/runs/{run.run_id}/concepts/{index}/label", headers=headers,
                           json={"label": label, "description": "", "tags": ["defect"], "version": 1})
        assert r.status_code == 200, r.text
    body = web_client.get(f"/api/runs/{run.run_id}").json()
    assert body["labelled_total"] == 2
    rows = {c["index"]: c for c in body["labelled"]}
    assert set(rows) == {run.universal[0], first} and rows[first]["tags"] == ["defect"]
    firing = rows[first]["frequency"]  # fires only in the first model
    assert firing[run.models[0]] > 0 and all(firing.get(m, 0) == 0 for m in run.models[1:])
    detail = web_client.get(f"/api/runs/{run.run_id}/concepts/{first}").json()
    assert firing == {f["model"]: f["frequency"] for f in detail["card"]["firing"]}
    # Beside each model's firing, the concept's strongest image there: the concept page's rank 0.
    strongest = {c["model"]: c["top_images"][0] for c in detail["columns"] if c["top_images"]}
    assert set(strongest) == {run.models[0]} and rows[first]["images"] == strongest
    assert set(rows[run.universal[0]]["images"]) == set(run.models)

    panel = web_client.get(f"/runs/{run.run_id}").text.split('id="labelled"')[1]
    assert 'id="labelled-empty"' not in panel
    assert "Crack &lt;edge&gt;" in panel and "<edge>" not in panel
    assert f'href="/runs/{run.run_id}/concepts/{first}"' in panel
    for model, image in strongest.items():
        assert f'src="/media/{image["heatmap"]}"' in panel
    assert panel.count('class="heat mini"') == len(run.models) + 1  # all for the universal one, one for "Stain"
    assert panel.count('class="heat mini blank"') == len(run.models) - 1
    headers = [f'<th class="model-name">{m.replace("_", "_<wbr>")}</th>' for m in run.models]  # wrap after '_'
    assert all(h in panel for h in headers)


def test_overview_plots_the_training_log_when_the_mine_kept_one(web_client, seeded):
    import sqlalchemy as sa

    from app.db import session_factory
    from app.models import Run

    path = f"/runs/{seeded.run.run_id}"
    assert 'id="training"' not in web_client.get(path).text  # the seeded mine kept no log
    with session_factory(seeded.settings.db_url)() as s:
        run = s.get(Run, seeded.run.run_id)
        names = [m.name for m in run.models]
        curve = {"step": [50, 100, 150], "loss": [0.9, 0.5, 0.4], "r2": {m: [0.1, 0.5, 0.6] for m in names}}
        run.metrics = {**run.metrics, "training": curve}
        s.commit()
    page = web_client.get(path).text
    training = page[page.index('id="training"'):]
    assert "3 logged steps, up to step 150" in training
    assert training.count("<polyline") == 1 + len(names)  # the loss, then one line per model
    assert web_client.get(f"/api{path}").json()["training"] == curve


def test_error_pages_speak_plainly_and_offer_a_way_on(client, data):
    """An address no page has is 404 in words; bad filters name the field and what it takes, and
    the page offers itself again without them."""
    from app.main import NO_SUCH_PAGE

    run = data.run.run_id
    for url in (f"/runs/{run}/concepts/abc", "/no-such-page"):
        r = client.get(url)
        assert r.status_code == 404 and html.escape(NO_SUCH_PAGE) in r.text, url
        assert "Input should" not in r.text and "Not Found" not in r.text
    r = client.get(f"/runs/{run}/concepts?sort=bogus&q=x")
    assert r.status_code == 400 and "sort should be &#39;energy&#39;" in r.text and "Input should" not in r.text
    assert f'id="without-filters" href="/runs/{run}/concepts"' in r.text
    assert "without-filters" not in client.get(f"/runs/{run}/concepts/99999").text  # a 404 has no filters to drop
    api = client.get(f"/api/runs/{run}/concepts", params={"sort": "bogus"})
    assert api.status_code == 400 and api.json()["detail"].startswith("These filters are not valid: sort should be")


def test_mostly_badge_and_filter_follow_one_rule(web_client, seeded):
    """A model-specific concept is "mostly in" every model with at least its fair share (1/3 here)
    of its firings, largest first; "Mostly in model X" finds exactly the concepts whose badge
    names X. (The badge once named only the largest share, "mostly cnn_m" for 50% against 49%,
    while the filter asked for half the firings: the two disagreed on the concepts a manager reads.)"""
    import sqlalchemy as sa

    from app.db import session_factory
    from app.models import Concept, ConceptModelStats, RunModel

    run = seeded.run
    names = list(run.models)  # vit_s, cnn_m, clip_b
    a, b, c = run.universal[:3]
    planted = {a: (0.49, 0.50, 0.01), b: (0.70, 0.15, 0.15), c: (0.48, 0.04, 0.48),
               run.universal[3]: (0.59, 0.20, 0.21)}  # entropy 0.87: universal, in no model's filter
    with session_factory(seeded.settings.db_url)() as s:
        ids = dict(s.execute(sa.select(RunModel.name, RunModel.id).where(RunModel.run_id == run.run_id)).all())
        for index, shares in planted.items():
            concept = s.scalars(sa.select(Concept).where(Concept.run_id == run.run_id, Concept.index == index)).one()
            concept.firing_entropy = float(-sum(p * math.log(p) for p in shares) / math.log(3))
            for name, share in zip(names, shares):
                s.execute(sa.update(ConceptModelStats).where(ConceptModelStats.concept_id == concept.id,
                                                             ConceptModelStats.run_model_id == ids[name])
                          .values(share=share))
        s.commit()
    cards = {card["index"]: card for card in web_client.get(
        f"/api/runs/{run.run_id}/concepts", params={"per_page": 200, "show_dead": True}).json()["concepts"]}
    assert cards[a]["mostly_in"] == ["cnn_m", "vit_s"]
    assert cards[b]["mostly_in"] == ["vit_s"]
    assert cards[c]["mostly_in"] == ["vit_s", "clip_b"]  # a tie: the run's model order
    assert cards[run.universal[3]]["universal"] and cards[run.universal[3]]["mostly_in"] == []
    for name in names:
        found = {card["index"] for card in web_client.get(
            f"/api/runs/{run.run_id}/concepts", params={"per_page": 200, "mostly": name}).json()["concepts"]}
        assert found == {i for i, card in cards.items() if name in card["mostly_in"]}, name
        page = web_client.get(f"/runs/{run.run_id}/concepts", params={"per_page": 200, "mostly": name}).text
        assert set(_indices(page)) == found
    page = web_client.get(f"/runs/{run.run_id}/concepts", params={"per_page": 200}).text
    assert '>mostly <span>cnn_m</span> + <span>vit_s</span></span>' in page
    assert '>mostly <span>vit_s</span> + <span>clip_b</span></span>' in page
    concept_page = web_client.get(f"/runs/{run.run_id}/concepts/{a}").text
    assert '>mostly <span>cnn_m</span> + <span>vit_s</span></span>' in concept_page


def _view_order(client, run_id: int, query: dict) -> list[int]:
    body = client.get(f"/api/runs/{run_id}/concepts", params={**query, "per_page": 200}).json()
    assert body["pages"] == 1
    return [c["index"] for c in body["concepts"]]


def test_a_concept_opened_from_a_list_steps_through_that_list(client, data):
    run = data.run.run_id
    browser = client.get(f"/runs/{run}/concepts", params={"sort": "entropy", "min_entropy": 0.5, "per_page": 5}).text
    first = _indices(browser)[0]
    assert f'href="/runs/{run}/concepts/{first}?sort=entropy&amp;min_entropy=0.5&amp;per_page=5"' in browser
    default = client.get(f"/runs/{run}/concepts").text  # the default sort is named, so the page knows its list
    assert f'href="/runs/{run}/concepts/{_indices(default)[0]}?sort=energy"' in default
    for query in ({"sort": "entropy", "min_entropy": 0.5, "per_page": 5},  # a cached, statistics-only list
                  {"sort": "cofire", "labelled": "unlabelled"}):          # label filters: read in SQL each time
        order = _view_order(client, run, query)
        assert len(order) >= 2
        for place in (0, len(order) // 2, len(order) - 1):
            page = client.get(f"/runs/{run}/concepts/{order[place]}", params=query).text
            prev = re.search(r'rel="prev" href="([^"]+)"', page)
            nxt = re.search(r'rel="next" href="([^"]+)"', page)
            assert (html.unescape(prev.group(1)).split("?")[0].rsplit("/", 1)[1] if prev else None) == \
                (str(order[place - 1]) if place > 0 else None), (query, place)
            assert (html.unescape(nxt.group(1)).split("?")[0].rsplit("/", 1)[1] if nxt else None) == \
                (str(order[place + 1]) if place + 1 < len(order) else None), (query, place)
            if nxt:
                assert "sort=" + query["sort"] in nxt.group(1)  # the next page stays in the list
            assert f">{place + 1} of {len(order)} in the list</a>" in page
    # Back to the list: the page of the list that holds the concept.
    order = _view_order(client, run, {"sort": "entropy", "min_entropy": 0.5})
    page = client.get(f"/runs/{run}/concepts/{order[6]}", params={"sort": "entropy", "min_entropy": 0.5,
                                                                  "per_page": 5}).text
    back = html.unescape(re.search(r'id="back-to-list" href="([^"]+)"', page).group(1))
    assert back == f"/runs/{run}/concepts?sort=entropy&min_entropy=0.5&page=2&per_page=5"
    assert order[6] in _indices(client.get(back).text)
    # A concept outside the list (or a page opened without one) steps by number, as before.
    outside = next(i for i in range(data.run.n_concepts) if i not in order and i not in data.run.dead)
    page = client.get(f"/runs/{run}/concepts/{outside}", params={"sort": "entropy", "min_entropy": 0.5}).text
    assert 'id="back-to-list"' not in page
    assert f'rel="next" href="/runs/{run}/concepts/{outside + 1}"' in page
    # A list sorted lowest first: previous / next walk it that way, and the way back names it.
    query = {"sort": "entropy", "order": "asc", "per_page": 5}
    order = _view_order(client, run, query)
    assert order == _view_order(client, run, {"sort": "entropy"})[::-1]
    page = client.get(f"/runs/{run}/concepts/{order[6]}", params=query).text
    assert f'rel="prev" href="/runs/{run}/concepts/{order[5]}?sort=entropy&amp;order=asc&amp;per_page=5"' in page
    assert f'rel="next" href="/runs/{run}/concepts/{order[7]}?sort=entropy&amp;order=asc&amp;per_page=5"' in page
    assert f">7 of {len(order)} in the list</a>" in page
    back = html.unescape(re.search(r'id="back-to-list" href="([^"]+)"', page).group(1))
    assert back == f"/runs/{run}/concepts?sort=entropy&order=asc&page=2&per_page=5"
    assert order[6] in _indices(client.get(back).text)
    assert client.get(f"/runs/{run}/concepts/1", params={"mostly": "nope"}).status_code == 400
    assert client.get(f"/runs/{run}/concepts/1", params={"sort": "bogus"}).status_code == 400


def test_no_dead_concepts_no_link_to_them(web_client, seeded):
    import sqlalchemy as sa

    from app.db import session_factory
    from app.models import Concept

    with session_factory(seeded.settings.db_url)() as s:
        s.execute(sa.update(Concept).values(dead=False))
        s.commit()
    page = web_client.get(f"/runs/{seeded.run.run_id}").text
    assert 'id="count-dead">0<' in page
    assert re.search(r'<div class="stat">\s*<div class="label">Dead concepts', page)  # a count, not a link


def test_a_label_search_list_follows_label_edits(web_client, seeded):
    """A search list's order is kept between concept pages, but never past a label edit."""
    run = seeded.run
    csrf = {"X-CSRF-Token": web_client.get("/api/auth/csrf").json()["csrf_token"]}
    a, b, c = sorted(run.universal[:3])

    def label(index: int, text: str) -> None:
        version = web_client.get(f"/api/runs/{run.run_id}/concepts/{index}").json()["version"]
        r = web_client.put(f"/api/runs/{run.run_id}/concepts/{index}/label", headers=csrf,
                           json={"label": text, "version": version})
        assert r.status_code == 200, r.text

    for index in (a, b, c):
        label(index, f"crack {index}")
    query = {"q": "crack", "sort": "index"}
    page = web_client.get(f"/runs/{run.run_id}/concepts/{b}", params=query).text
    assert ">2 of 3 in the list</a>" in page and f"/concepts/{c}?" in page
    label(c, "stain")
    page = web_client.get(f"/runs/{run.run_id}/concepts/{b}", params=query).text
    assert ">2 of 2 in the list</a>" in page and 'rel="next"' not in page
    label(b, "dent")  # out of the list: the page steps by number again
    page = web_client.get(f"/runs/{run.run_id}/concepts/{b}", params=query).text
    assert 'id="back-to-list"' not in page and f'rel="next" href="/runs/{run.run_id}/concepts/{b + 1}"' in page
