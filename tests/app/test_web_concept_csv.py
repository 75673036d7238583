"""The concept browser's CSV download: every matching concept, per-model statistics read back
from the database, user text that a spreadsheet cannot run, and audit links kept to their scope."""

from __future__ import annotations

import csv
import io
import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.db import session_factory
from app.models import Concept, ConceptDefectIoU, ConceptModelStats, ConceptTag, Run, RunModel, ShareLink
from tests.app.webapp import csrf_from


def _rows(response) -> list[dict[str, str]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    text = response.content.decode("utf-8")
    assert text.startswith("\ufeff")  # Excel reads UTF-8 only with the byte-order mark
    return list(csv.DictReader(io.StringIO(text.removeprefix("\ufeff"), newline="")))


def _all_pages(client: TestClient, run_id: int, query: str = "") -> list[int]:
    """Concept numbers of a browser view in order, read page by page from the JSON API."""
    indices, page = [], 1
    while True:
        body = client.get(f"/api/runs/{run_id}/concepts?per_page=7&page={page}&{query}").json()
        indices += [c["index"] for c in body["concepts"]]
        if page >= body["pages"]:
            return indices
        page += 1


def test_csv_has_every_concept_of_the_view_with_the_databases_statistics(web_client, seeded):
    run = seeded.run
    response = web_client.get(f"/runs/{run.run_id}/concepts.csv")
    assert response.headers["content-disposition"] == 'attachment; filename="demo-run-concepts.csv"'
    rows = _rows(response)
    # The browser's order across all its pages; dead concepts only when shown.
    assert [int(r["concept"]) for r in rows] == _all_pages(web_client, run.run_id)
    assert len(rows) == run.n_concepts - len(run.dead)
    dead = _rows(web_client.get(f"/runs/{run.run_id}/concepts.csv?show_dead=1&sort=index"))
    assert [int(r["concept"]) for r in dead] == list(range(run.n_concepts))
    assert {int(r["concept"]) for r in dead if r["status"] == "dead"} == set(run.dead)

    by_index = {int(r["concept"]): r for r in dead}
    with session_factory(seeded.settings.db_url)() as session:
        models = {m.id: m.name for m in session.scalars(select(RunModel).where(RunModel.run_id == run.run_id))}
        concepts = {c.id: c for c in session.scalars(select(Concept).where(Concept.run_id == run.run_id))}
        for stat in session.scalars(select(ConceptModelStats).where(ConceptModelStats.concept_id.in_(concepts))):
            row, name = by_index[concepts[stat.concept_id].index], models[stat.run_model_id]
            assert float(row[f"{name} frequency"]) == pytest.approx(stat.frequency, rel=1e-5)
            assert float(row[f"{name} share of firings"]) == pytest.approx(stat.share, rel=1e-5)
            assert float(row[f"{name} co-fire"]) == pytest.approx(stat.cofire, rel=1e-5)
            assert float(row[f"{name} max activation"]) == pytest.approx(stat.max_activation, rel=1e-5)
        for c in concepts.values():
            assert float(by_index[c.index]["energy"]) == pytest.approx(c.energy, rel=1e-5)
            assert float(by_index[c.index]["firing entropy"]) == pytest.approx(c.firing_entropy, rel=1e-5, abs=1e-9)
        best: dict[tuple[int, str], float] = {}
        for iou in session.scalars(select(ConceptDefectIoU).where(ConceptDefectIoU.concept_id.in_(concepts))):
            key = (concepts[iou.concept_id].index, iou.defect_type)
            best[key] = max(best.get(key, 0.0), iou.iou)
    assert best  # the seeded run has defect overlaps to check
    for (index, defect), iou in best.items():
        assert float(by_index[index][f"{defect} best IoU"]) == pytest.approx(iou, rel=1e-5)
    assert by_index[run.n_concepts - 1]["crack best IoU"] == ""  # no overlap recorded: an empty cell
    first = run.models[0]
    for index in run.only_first[:3]:
        assert by_index[index]["status"] == "model-specific" and by_index[index]["mostly in"] == first
        assert float(by_index[index][f"{first} share of firings"]) == 1.0
    assert by_index[run.universal[0]]["status"] == "universal" and by_index[run.universal[0]]["mostly in"] == ""
    # The column says what the browser's badge says, concept by concept.
    cards = web_client.get(f"/api/runs/{run.run_id}/concepts", params={"per_page": 200}).json()["concepts"]
    assert {c["index"]: " + ".join(c["mostly_in"]) for c in cards} == \
        {int(r["concept"]): r["mostly in"] for r in by_index.values() if r["status"] != "dead"}


def test_csv_follows_the_filters_but_not_the_paging(web_client, seeded):
    run = seeded.run
    first = run.models[0]
    rows = _rows(web_client.get(f"/runs/{run.run_id}/concepts.csv?mostly={first}&sort=entropy&page=2&per_page=3"))
    assert [int(r["concept"]) for r in rows] == _all_pages(web_client, run.run_id, f"mostly={first}&sort=entropy")
    assert rows and all(float(r[f"{first} share of firings"]) >= 0.5 for r in rows)
    assert len(rows) > 3  # every page, not page 2 of 3-concept pages
    # Lowest first too, as the browser pages it.
    rows = _rows(web_client.get(f"/runs/{run.run_id}/concepts.csv?mostly={first}&sort=entropy&order=asc"))
    assert [int(r["concept"]) for r in rows] == \
        _all_pages(web_client, run.run_id, f"mostly={first}&sort=entropy&order=asc")
    everything = _rows(web_client.get(f"/runs/{run.run_id}/concepts.csv?sort=energy&order=asc"))
    assert [int(r["concept"]) for r in everything] == _all_pages(web_client, run.run_id, "sort=energy")[::-1]
    energies = [float(r["energy"]) for r in everything]
    assert energies == sorted(energies)
    assert web_client.get(f"/runs/{run.run_id}/concepts.csv?order=sideways").status_code == 400
    assert web_client.get(f"/runs/{run.run_id}/concepts.csv?mostly=nope").status_code == 400
    assert web_client.get(f"/runs/{run.run_id}/concepts.csv?min_entropy=2").status_code == 400
    # The browser's button carries the view's filters, without its page.
    page = web_client.get(f"/runs/{run.run_id}/concepts?mostly={first}&page=2&per_page=3").text
    link = re.search(r'id="download-csv" href="([^"]+)"', page).group(1).replace("&amp;", "&")
    assert link == f"/runs/{run.run_id}/concepts.csv?mostly={first}"
    assert _rows(web_client.get(link)) == _rows(web_client.get(f"/runs/{run.run_id}/concepts.csv?mostly={first}"))


def test_user_text_is_quoted_and_never_a_formula(web_client, seeded):
    run = seeded.run
    label = '=HYPERLINK("http://evil.example","click")'
    description = 'Rim, "shiny"\nsecond line'
    with session_factory(seeded.settings.db_url)() as session:
        concept_id = session.scalar(select(Concept.id).where(Concept.run_id == run.run_id, Concept.index == 0))
        session.execute(update(Concept).where(Concept.id == concept_id).values(label=label, description=description))
        session.add_all([ConceptTag(concept_id=concept_id, tag="@risk"), ConceptTag(concept_id=concept_id, tag="rim")])
        session.commit()
    rows = _rows(web_client.get(f"/runs/{run.run_id}/concepts.csv?q=hyperlink"))
    assert len(rows) == 1 and rows[0]["concept"] == "0"
    assert rows[0]["label"] == "'" + label  # shown as text by Excel and LibreOffice
    assert rows[0]["description"] == description  # comma, quotes and line break survive the round trip
    assert rows[0]["tags"] == "'@risk; rim"


def test_audit_links_download_only_their_scope(web_client, seeded):
    run = seeded.run
    with TestClient(web_client.app) as holder:
        assert holder.get(f"/runs/{run.run_id}/concepts.csv", follow_redirects=False).status_code == 303  # log in
        paths = {}
        for scope, extra in (("concepts", {"concepts": "0, 3"}), ("run", {})):
            page = web_client.get("/shares").text
            made = web_client.post("/shares", data={"csrf_token": csrf_from(page), "run_id": str(run.run_id),
                                                    "scope": scope, **extra})
            paths[scope] = re.search(r'id="share-url" value="http://testserver(/s/[^"]+)"', made.text).group(1)
        some = _rows(holder.get(f"{paths['concepts']}/runs/{run.run_id}/concepts.csv?show_dead=1"))
        assert sorted(int(r["concept"]) for r in some) == [0, 3]
        assert 'id="download-csv"' in holder.get(f"{paths['concepts']}/runs/{run.run_id}/concepts").text
        whole = _rows(holder.get(f"{paths['run']}/runs/{run.run_id}/concepts.csv"))
        assert len(whole) == run.n_concepts - len(run.dead)
        assert holder.get(f"{paths['run']}/runs/{seeded.other.run_id}/concepts.csv").status_code == 404
        with session_factory(seeded.settings.db_url)() as session:
            session.execute(update(ShareLink).values(revoked_at=ShareLink.created_at))
            session.commit()
        assert holder.get(f"{paths['run']}/runs/{run.run_id}/concepts.csv").status_code == 410


def test_the_table_reads_the_same_on_sqlite_and_postgres(db_url, data_dir):
    """A team's shared Postgres gives the same table as the SQLite file: every concept, tags in
    order, the best IoU per defect type over the models."""
    from app.schemas.concepts import ConceptFilters
    from app.services.concept_table import concept_csv
    from tests.app.seed import seed_run

    with session_factory(db_url)() as session:
        seeded = seed_run(session, data_dir / "media", write_files=False)
        concept = session.scalar(select(Concept).where(Concept.run_id == seeded.run_id, Concept.index == 2))
        concept.label = "-1 cm dent"
        session.add_all([ConceptTag(concept_id=concept.id, tag="zeta"), ConceptTag(concept_id=concept.id, tag="alpha")])
        session.commit()
        run = session.get(Run, seeded.run_id)
        text = concept_csv(session, run=run, filters=ConceptFilters(sort="index", show_dead=True))
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [int(r["concept"]) for r in rows] == list(range(seeded.n_concepts))
    assert rows[2]["label"] == "'-1 cm dent" and rows[2]["tags"] == "alpha; zeta"
    assert float(rows[2]["crack best IoU"]) == pytest.approx(0.4) and rows[2]["scratch best IoU"] == ""
    assert float(rows[3]["scratch best IoU"]) == pytest.approx(0.5)
    assert {r["status"] for r in rows} == {"universal", "model-specific", "dead"}
