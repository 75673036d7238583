"""`usae demo --small --no-serve`: the one-command main job, end to end on the real offline
backbones, then its concept pages through the web app."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.app.webapp import login

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("demo") / "data"
    proc = subprocess.run([sys.executable, "-m", "app.cli", "demo", "--small", "--no-serve", "--data-dir",
                           str(data_dir)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return data_dir, proc.stdout


def test_demo_reports_every_stage_and_prints_a_login(demo):
    _, out = demo
    for stage in ("1/4 images", "2/4 extract", "3/4 train", "4/4 mine"):
        assert f"[{stage}]" in out, out
    assert re.search(r"R² self \d\.\d\d / cross \d\.\d\d, [\d,]+ live concepts", out), out
    assert "mobilenet_v2" in out and "efficientnet_lite0" in out and "hed_vgg16" in out
    assert re.search(r"analyst login: analyst / \S+", out), out


def test_rerun_reuses_finished_stages(demo):
    data_dir, first = demo
    proc = subprocess.run([sys.executable, "-m", "app.cli", "demo", "--small", "--no-serve", "--data-dir",
                           str(data_dir)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in ("1/4 images", "2/4 extract", "3/4 train", "4/4 mine"):
        assert f"[{stage}] reused:" in proc.stdout, proc.stdout
    assert re.search(r"\[3/4 train\] reused: [\d,]+ concepts, k=\d+, [\d,]+ steps", proc.stdout), proc.stdout
    password = re.search(r"analyst login: analyst / (\S+)", first).group(1)
    assert f"analyst / {password}" in proc.stdout  # the same credentials, printed again


def test_concept_pages_show_images_for_every_model(demo):
    data_dir, out = demo
    password = re.search(r"analyst login: analyst / (\S+)", out).group(1)
    with TestClient(create_app(Settings(data_dir=data_dir))) as client:
        login(client, "analyst", password)
        runs = client.get("/api/runs").json()
        assert len(runs) == 1
        run = runs[0]
        overview = client.get(f"/api/runs/{run['id']}").json()
        assert overview["r2_self"] > 0.3 and {d["defect_type"] for d in overview["best_per_defect"]} >= {"crack", "stain"}
        page = client.get(f"/api/runs/{run['id']}/concepts", params={"sort": "energy"}).json()
        top = page["concepts"][0]["index"]
        detail = client.get(f"/api/runs/{run['id']}/concepts/{top}").json()
        models = {col["model"] for col in detail["columns"]}
        assert models == {"mobilenet_v2", "efficientnet_lite0", "hed_vgg16"}
        for col in detail["columns"]:
            assert col["top_images"], col["model"]
            for image in col["top_images"][:2]:
                for path in (image["thumbnail"], image["heatmap"]):
                    response = client.get(f"/media/{path}")
                    assert response.status_code == 200 and response.content[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb")
        html = client.get(f"/runs/{run['id']}/concepts/{top}").text
        for model in models:
            assert model in html


def test_a_changed_plan_retrains_and_re_mines_but_keeps_the_images_and_store(demo):
    """After an upgrade changes the demo's plan, a rerun must not serve the old run: a run trained
    with another dictionary size is trained again and mined again, upstream stages are reused."""
    import json

    data_dir, _ = demo
    config = data_dir / "runs" / "demo-small" / "config.json"
    saved = json.loads(config.read_text())
    saved["usae"]["n_concepts"] += 1  # as if an older version had trained another size
    config.write_text(json.dumps(saved))
    proc = subprocess.run([sys.executable, "-m", "app.cli", "demo", "--small", "--no-serve", "--data-dir",
                           str(data_dir)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[1/4 images] reused:" in proc.stdout and "[2/4 extract] reused:" in proc.stdout, proc.stdout
    assert "[3/4 train] reused:" not in proc.stdout and "[4/4 mine] reused:" not in proc.stdout, proc.stdout
    assert json.loads(config.read_text())["usae"]["n_concepts"] == saved["usae"]["n_concepts"] - 1


def test_a_training_rebuild_cut_short_is_continued_not_started_again(demo, monkeypatch):
    """A retrain stopped after its first checkpoint leaves the new run beside the old one; the
    same command again continues it from that checkpoint and swaps it in when it finishes."""
    import json

    import usae_core.train
    from app.pipeline import run_demo

    data_dir, _ = demo
    settings = Settings(data_dir=data_dir)
    run_dir = data_dir / "runs" / "demo-small"
    saved = json.loads((run_dir / "config.json").read_text())
    saved["usae"]["n_concepts"] += 1  # the finished run no longer matches the plan: retrain
    (run_dir / "config.json").write_text(json.dumps(saved))
    real_save = usae_core.train.Trainer.save_checkpoint

    def save_then_stop(trainer):
        real_save(trainer)
        if trainer.step > 0:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(usae_core.train.Trainer, "save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            run_demo(settings, small=True, device="cpu", echo=lambda line: None)
    replacing = data_dir / "runs" / ".demo-small.replacing"
    assert sorted(p.name for p in (replacing / "checkpoints").iterdir()) == ["step-00000150"]

    resumed_at = []
    real_load = usae_core.train.Trainer.load_latest_checkpoint

    def load_and_note(trainer):
        found = real_load(trainer)
        resumed_at.append(trainer.step if found else None)
        return found

    monkeypatch.setattr(usae_core.train.Trainer, "load_latest_checkpoint", load_and_note)
    lines = []
    run_demo(settings, small=True, device="cpu", echo=lines.append)
    assert resumed_at == [150], lines
    assert any("[3/4 train]" in line and "continued an interrupted training" in line for line in lines), lines
    final = json.loads((run_dir / "config.json").read_text())
    assert final["step"] == 600 and final["usae"]["n_concepts"] == saved["usae"]["n_concepts"] - 1
    assert not replacing.exists() and not (data_dir / ".demo-demo-small-training.json").exists()
    assert any(line.startswith("[4/4 mine]") and "reused" not in line for line in lines), lines  # re-mined


def test_ctrl_c_says_which_stage_stopped_and_the_same_command_continues(demo, tmp_path):
    """Ctrl+C in `usae demo` exited 130 without a word. Interrupted in a retraining after its first
    checkpoint, it names the stage in one line; the same command then continues the training."""
    import json
    import os
    import signal
    import time

    from tests.conftest import restore_ctrl_c

    data_dir, _ = demo
    config = data_dir / "runs" / "demo-small" / "config.json"
    saved = json.loads(config.read_text())
    saved["usae"]["n_concepts"] += 1  # the finished run no longer matches the plan: it is trained again
    config.write_text(json.dumps(saved))
    command = [sys.executable, "-m", "app.cli", "demo", "--small", "--no-serve", "--data-dir", str(data_dir)]
    checkpoints = data_dir / "runs" / ".demo-small.replacing" / "checkpoints"
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                stderr=err, preexec_fn=restore_ctrl_c)
    try:
        deadline = time.monotonic() + 300
        while not list(checkpoints.glob("step-*")):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr").read_text()[-2000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        proc.kill()
        proc.wait()
    stderr = (tmp_path / "stderr").read_text()
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if "interrupted" in line]
    assert lines == ["usae demo interrupted in [3/4 train]; run the same command again to continue: the stages it "
                     "finished are reused, and the training continues from its newest checkpoint"], stderr[-2000:]

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert re.search(r"\[3/4 train\] .*\(continued an interrupted training\)", again.stdout), again.stdout


def test_a_store_extracted_from_another_seeds_images_is_not_reused(demo, monkeypatch, tmp_path):
    """Each seed has its own image folder, so going back to a seed whose images are current
    must still extract again when the store was made from another seed's images."""
    import usae_core.extract
    from app import pipeline

    data_dir, _ = demo
    calls = []

    def extract_store(*args, **kwargs):
        calls.append(kwargs.get("overwrite"))
        raise KeyboardInterrupt

    monkeypatch.setattr(usae_core.extract, "extract_store", extract_store)
    settings = Settings(data_dir=data_dir)
    store, _, reused = pipeline.extract(settings, pipeline.SMALL, data_dir / "images" / "demo-small", "cpu", False)
    assert reused and calls == []  # its own images: reused
    with pytest.raises(KeyboardInterrupt):
        pipeline.extract(settings, pipeline.SMALL, tmp_path / "demo-small-seed1", "cpu", False)
    assert calls == [True]  # another folder's images: extracted again, replacing the store


def test_a_rebuild_cut_short_does_not_leave_old_outputs_looking_current(demo, monkeypatch):
    """New images make the store stale. If the rerun is stopped while extracting, the old store
    is still complete on disk (an overwrite only swaps at the end); the next run must extract
    again, not reuse it. (Runs last: it leaves the module's demo on other images.)"""
    import usae_core.extract
    from app.pipeline import run_demo

    data_dir, _ = demo
    settings = Settings(data_dir=data_dir)
    calls = []

    def stopped(*args, **kwargs):
        calls.append(kwargs.get("overwrite"))
        raise KeyboardInterrupt

    monkeypatch.setattr(usae_core.extract, "extract_store", stopped)
    for _ in range(2):  # new images (seed 1), stopped in extraction; then the same command again
        with pytest.raises(KeyboardInterrupt):
            run_demo(settings, small=True, device="cpu", seed=1, echo=lambda line: None)
    assert calls == [True, True]  # the second run did not take the old store for current
