"""`usae runs list` and `usae runs delete`: a run leaves the database and its media in one go,
only when nothing is still working on it, and its neighbours are untouched."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select, text, update
from typer.testing import CliRunner

from app.cli import cli
from app.db import session_factory
from app.models import CamImage, Concept, Job, LabelHistory, MiningGeneration, Run, RunModel, ShareLink
from app.services.runs import delete_run, remove_orphaned_run_media
from tests.app.seed import create_analyst, seed_run
from tests.app.webapp import csrf_from, sign_in_as


def _usae(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, list(args), input=input)


def _count(session, model, *where) -> int:
    return session.scalar(select(func.count()).select_from(model).where(*where))


def test_delete_a_run_with_everything_analysts_made_of_it(web, seeded):
    run, other = seeded.run, seeded.other
    where = ["--data-dir", str(seeded.data_dir)]
    client = sign_in_as(web, seeded, "alice")
    page = client.get(f"/runs/{run.run_id}/concepts/0").text
    assert client.post(f"/runs/{run.run_id}/concepts/0/label", data={
        "csrf_token": csrf_from(page), "version": "1", "label": "Rim", "description": "", "tags": "metal"},
        follow_redirects=False).status_code == 303
    made = client.post("/shares", data={"csrf_token": csrf_from(client.get("/shares").text),
                                        "run_id": str(run.run_id), "scope": "run"})
    link = re.search(r'id="share-url" value="http://testserver(/s/[^"]+)"', made.text).group(1)
    media = seeded.settings.media_dir
    cam = media / f"cam/run-{run.run_id}/concept-0/vit_s-job1.png"
    cam.parent.mkdir(parents=True)
    cam.write_bytes(b"png")
    other_files = sorted(p for p in media.rglob("*") if p.is_file() and (
        f"runs/{other.run_id}/" in p.as_posix() or p.as_posix().endswith(f"cam/{other.run_id}/0-vit_s.png")))
    assert other_files and (media / f"runs/{run.run_id}").is_dir()
    with session_factory(seeded.settings.db_url)() as session:
        session.add(Job(kind="cam", status="queued", run_id=run.run_id, concept_index=0))
        session.commit()

    listing = _usae("runs", "list", *where)
    assert listing.exit_code == 0, listing.output
    lines = {line.split()[1]: line.split() for line in listing.output.splitlines()[1:]}
    assert lines["demo-run"][:5] == [str(run.run_id), "demo-run", "mined", "30", "1"]  # one labelled concept
    assert lines["other-run"][:5] == [str(other.run_id), "other-run", "mined", "6", "0"]

    busy = _usae("runs", "delete", "demo-run", "--yes", *where)
    assert busy.exit_code != 0 and "1 CAM job queued or running" in str(busy.exception)
    with session_factory(seeded.settings.db_url)() as session:
        session.execute(update(Job).values(status="done"))
        session.commit()
    asked = _usae("runs", "delete", "demo-run", *where, input="n\n")
    assert asked.exit_code == 1 and "nothing deleted" in asked.output
    assert "30 concepts, 1 labelled (1 label edit), 1 CAM image, 1 open audit link" in asked.output
    assert client.get(f"/runs/{run.run_id}").status_code == 200  # still there
    unknown = _usae("runs", "delete", "no-such-run", "--yes", *where)
    assert "no run named 'no-such-run'" in str(unknown.exception) and "demo-run, other-run" in str(unknown.exception)

    gone = _usae("runs", "delete", str(run.run_id), "--yes", *where)  # by id works too
    assert gone.exit_code == 0, gone.output
    assert re.search(r"deleted run demo-run; its run directory \S+/runs/demo-run was kept", gone.output)
    with session_factory(seeded.settings.db_url)() as session:
        assert _count(session, Run, Run.id == run.run_id) == 0
        for model in (Concept, MiningGeneration, RunModel, ShareLink, Job):
            assert _count(session, model, model.run_id == run.run_id) == 0, model
        assert _count(session, LabelHistory) == 0 and _count(session, CamImage) == 1  # the other run's
        assert _count(session, Concept, Concept.run_id == other.run_id) == other.n_concepts
        assert session.execute(text("PRAGMA foreign_key_check")).all() == []
    assert not (media / f"runs/{run.run_id}").exists() and not (media / f"cam/run-{run.run_id}").exists()
    assert all(p.is_file() for p in other_files)
    assert client.get(f"/runs/{run.run_id}").status_code == 404
    assert client.get(f"/runs/{other.run_id}/concepts").status_code == 200
    assert web.get(link).status_code == 404  # the audit link went with the run
    listing = _usae("runs", "list", *where)
    assert [line.split()[1] for line in listing.output.splitlines()[1:]] == ["other-run"]


def test_deleted_run_ids_are_never_handed_out_again(db_url, data_dir):
    """A run id names media folders and keys cached pages: a new run after the newest was
    deleted gets a new id, on SQLite as on Postgres."""
    Session = session_factory(db_url)
    with Session() as session:
        create_analyst(session, "alice")
        first = seed_run(session, data_dir / "media", name="first", write_files=False)
        last = seed_run(session, data_dir / "media", name="last", n_concepts=6, write_files=False)
        session.commit()
        delete_run(session, run=session.get(Run, last.run_id), media_dir=data_dir / "media")
        assert session.get(Run, first.run_id) is not None
        assert _count(session, Concept, Concept.run_id == first.run_id) == first.n_concepts
        again = seed_run(session, data_dir / "media", name="last", n_concepts=6, write_files=False)
        session.commit()
    assert again.run_id > last.run_id


def test_a_run_being_mined_is_not_deleted(db_url, data_dir):
    Session = session_factory(db_url)
    with Session() as session:
        run = seed_run(session, data_dir / "media", write_files=False)
        session.execute(update(Run).values(status="mining"))
        session.add(MiningGeneration(run_id=run.run_id, status="building", media_prefix="x",
                                     params={"owner": {"host": "another-machine", "pid": 1}}))
        session.commit()
        with pytest.raises(Exception, match="is being mined right now"):
            delete_run(session, run=session.get(Run, run.run_id), media_dir=data_dir / "media")
        assert _count(session, Concept, Concept.run_id == run.run_id) == run.n_concepts


def test_orphaned_media_of_deleted_runs_is_removed_and_nothing_else(seeded):
    """What a `usae runs delete` killed after its commit leaves behind goes at the next delete."""
    media: Path = seeded.settings.media_dir
    for folder in ("runs/9999/g1", "cam/run-9999/concept-0", "runs/not-a-run", "cam/run-x"):
        (media / folder).mkdir(parents=True)
    with session_factory(seeded.settings.db_url)() as session:
        removed = remove_orphaned_run_media(session, media_dir=media)
    assert sorted(removed) == ["cam/run-9999", "runs/9999"]
    assert not (media / "runs/9999").exists() and not (media / "cam/run-9999").exists()
    assert (media / "runs/not-a-run").is_dir() and (media / "cam/run-x").is_dir()
    assert (media / f"runs/{seeded.run.run_id}").is_dir() and (media / f"runs/{seeded.other.run_id}").is_dir()


def test_pages_of_other_runs_stay_current_after_a_delete(web, seeded):
    """The newest label edit's id is part of each run's page-cache version. Deleting the run that
    held the newest edit must not let SQLite hand that id out again (migration 0012): the next
    edit elsewhere would bring back a version already cached, and a stale page with it."""
    run, other = seeded.run, seeded.other
    client = sign_in_as(web, seeded, "alice")

    def label(run_id: int, text: str, version: int) -> None:
        page = client.get(f"/runs/{run_id}/concepts/0").text
        r = client.post(f"/runs/{run_id}/concepts/0/label", data={
            "csrf_token": csrf_from(page), "version": str(version), "label": text, "description": "", "tags": ""},
            follow_redirects=False)
        assert r.status_code == 303, r.text

    with session_factory(seeded.settings.db_url)() as session:  # the other run's CAM image would change the version too
        session.execute(delete(CamImage).where(CamImage.concept_id.in_(
            select(Concept.id).where(Concept.run_id == other.run_id))))
        session.commit()
    label(run.run_id, "First name", 1)
    label(other.run_id, "In the other run", 1)
    assert "First name" in client.get(f"/runs/{run.run_id}/concepts/0").text  # cached now
    with session_factory(seeded.settings.db_url)() as session:
        delete_run(session, run=session.get(Run, other.run_id), media_dir=seeded.settings.media_dir)
    label(run.run_id, "Second name", 2)
    page = client.get(f"/runs/{run.run_id}/concepts/0").text
    assert "Second name" in page and "First name" in page  # the new label, and the old one in its history
    assert page.index("Second name") < page.index("First name")


def test_export_writes_the_explorers_csv_of_every_concept(web, seeded, tmp_path):
    """`usae runs export` is the browser's Download CSV with dead concepts shown, by number: to
    a file (atomically, with the BOM a spreadsheet needs) or to standard output."""
    run = seeded.run
    where = ["--data-dir", str(seeded.data_dir)]
    client = sign_in_as(web, seeded, "alice")
    from_web = client.get(f"/runs/{run.run_id}/concepts.csv?show_dead=1&sort=index").content
    exports = tmp_path / "exports"
    exports.mkdir()
    target = exports / "audit.csv"
    written = _usae("runs", "export", "demo-run", "--out", str(target), *where)
    assert written.exit_code == 0, written.output
    assert target.read_bytes() == from_web
    assert f"wrote {run.n_concepts} concepts of run demo-run" in written.output
    printed = _usae("runs", "export", str(run.run_id), *where)
    assert not printed.stdout.startswith("\ufeff")  # no BOM in a pipe
    rows = list(csv.reader(io.StringIO(printed.stdout)))
    assert rows == list(csv.reader(io.StringIO(from_web.decode("utf-8-sig")))) and len(rows) == run.n_concepts + 1
    folder = _usae("runs", "export", "demo-run", "--out", str(exports), *where)
    assert "is a folder; name a file" in str(folder.exception)
    assert [p.name for p in exports.iterdir()] == ["audit.csv"]  # no temporary file left behind
