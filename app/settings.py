"""All configuration in one place. Every value can be set by an environment variable
prefixed `USAE_` (for example `USAE_DATA_DIR`, `USAE_DATABASE_URL`) or a `.env` file."""

from __future__ import annotations

import os
import secrets
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from usae_core.errors import UsaeError


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="USAE_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default=Path("usae-data"), description="Holds the DB, stores, runs, images and renders.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; defaults to a SQLite file in the data directory."
    )
    secret_key: str | None = Field(
        default=None, description="Signs session cookies and CSRF tokens; generated into the data dir when unset."
    )
    secure_cookies: bool = Field(
        default=False, description="Send the session cookie over HTTPS only (set it when serving behind TLS)."
    )
    public_url: str | None = Field(
        default=None, pattern=r"^https?://[^/?#\s]+(/[^?#\s]*)?$",
        description="The explorer's address as link holders reach it (https://explorer.example.com): audit links "
                    "are built on it. Unset, on the address the analyst's browser used (its Host header).")
    max_upload_bytes: int = 10 * 1024 * 1024
    login_attempts_per_minute: int = Field(
        default=10, ge=1, description="Sign-in attempts a minute from one address for one user name.")
    login_attempts_per_minute_per_address: int = Field(
        default=50, ge=1, description="Sign-in attempts a minute from one address (an IPv6 /64) over all user names.")
    device: str = "auto"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'usae.db').resolve()}"

    @property
    def stores_dir(self) -> Path:
        return self.data_dir / "stores"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def media_dir(self) -> Path:
        """Rendered files served to the browser: thumbnails, heatmaps, CAM images."""
        return self.data_dir / "media"

    def resolved_secret_key(self) -> str:
        """USAE_SECRET_KEY, else the data directory's `secret_key` file, made on first use."""
        if self.secret_key:
            return self.secret_key
        path = self.data_dir / "secret_key"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            _create_secret_key(path)
        return path.read_text().strip()


def _create_secret_key(path: Path) -> None:
    """Write a new key readable by its owner only from the first byte (whoever reads it can sign
    session cookies). Server processes starting together may all get here: the key is linked
    into place, which fails for all but the first, so every process reads the same key."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_urlsafe(48).encode())
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()


def existing_data_for(data_dir: Path | None) -> Settings:
    """Settings of a command that only reads or changes what is there (`runs list`, `user list`):
    a mistyped --data-dir is refused rather than made, with an empty database, to list nothing."""
    settings = settings_for(data_dir)
    if settings.database_url is None and not settings.data_dir.exists():
        raise UsaeError(f"there is no data directory at {settings.data_dir}: check --data-dir (or USAE_DATA_DIR); "
                        "`usae demo` or `usae extract` makes one")
    return settings


def settings_for(data_dir: Path | None) -> Settings:
    """Settings with `--data-dir` applied on top of the environment."""
    settings = Settings(data_dir=data_dir) if data_dir is not None else get_settings()
    if settings.data_dir.exists() and not settings.data_dir.is_dir():
        raise UsaeError(f"the data directory {settings.data_dir} is a file, not a folder; "
                        "pass --data-dir (or set USAE_DATA_DIR) to a folder")
    return settings
