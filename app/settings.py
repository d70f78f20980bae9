"""One settings object for every process (CLI, worker, web app).

Values come from flags, then ``ADAPTERLENS_*`` environment variables, then defaults.
``DATABASE_URL`` is read without the prefix because that is what docker compose and
every hosting tool set. When it is unset the embedded default is a SQLite file inside
the data directory, so a laptop needs nothing but this package.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADAPTERLENS_", extra="ignore", populate_by_name=True)

    data_dir: Path = Field(default=Path("data"), description="Holds the SQLite file, models, checkpoints.")
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "ADAPTERLENS_DATABASE_URL"),
        description="SQLAlchemy URL; unset means SQLite at <data_dir>/adapterlens.db.",
    )
    device: str = Field(default="auto", description="torch device for the worker: auto, cpu, cuda, cuda:1 …")
    train_nproc: int = Field(
        default=1, ge=1, description="Processes (GPUs) a train job uses by default; > 1 trains data parallel "
        "under torchrun."
    )
    api_allowed_paths: list[Path] = Field(
        default_factory=list, description="Directories besides the data directory whose models and files a request "
        "to the (unauthenticated) API may name, e.g. for POST /api/pipelines (a JSON list)."
    )
    api_allowed_models: list[str] = Field(
        default_factory=list, description="Hugging Face model ids the API may name (an id, or org/* for all of an "
        "organisation's; a JSON list)."
    )
    ablation_max_new_tokens: int = Field(
        default=512, ge=1, description="Most tokens an ablation or experiment may ask to generate per condition."
    )

    @cached_property
    def resolved_data_dir(self) -> Path:
        path = self.data_dir.expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def db_url(self) -> str:
        """The SQLAlchemy URL, normalised: postgres:// and postgresql:// use psycopg 3."""
        if not self.database_url:
            return f"sqlite:///{self.resolved_data_dir / 'adapterlens.db'}"
        url = self.database_url
        for prefix in ("postgres://", "postgresql://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url

    @property
    def models_dir(self) -> Path:
        return self.resolved_data_dir / "models"

    @property
    def runs_dir(self) -> Path:
        return self.resolved_data_dir / "runs"


def get_settings(**overrides: object) -> Settings:
    """Build settings; keyword overrides win over the environment (used by CLI flags and tests)."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
