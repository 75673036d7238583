"""The compose file validates; Docker itself cannot run here, so the same setup (the app on a
real PostgreSQL) is exercised by the Postgres-parametrised app tests."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_compose_file_validates_with_web_gpu_and_postgres():
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is missing: run bash scripts/install.sh")
    proc = subprocess.run([exe, "-f", str(ROOT / "docker-compose.yml"), "--profile", "gpu", "config", "--services"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert set(proc.stdout.split()) == {"web", "web-gpu", "db"}
    config = subprocess.run([exe, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True,
                            cwd=ROOT).stdout
    assert "postgresql+psycopg://" in config and "usae-data" in config and "usae-pg" in config


def test_dockerfile_installs_with_the_project_script():
    text = (ROOT / "Dockerfile").read_text()
    assert "scripts/install.sh" in text and 'CMD ["usae", "serve"' in text
