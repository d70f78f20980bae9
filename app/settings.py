"""One settings object for every process (CLI, worker, web app).

Values come from flags, then ``ADAPTERLENS_*`` environment variables, then defaults.
``DATABASE_URL`` is read without the prefix because that is what docker compose and
every hosting tool set. When it is unset the embedded default is a SQLite file inside
the data directory, so a laptop needs nothing but this package.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


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
    # --- web: what the dashboard accepts (docs/deploy.md, README "Operations") ---------------------------------
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default=list(LOOPBACK_HOSTS), description="Host names the dashboard answers (comma-separated in the "
        "environment; '*.example.org' matches subdomains, '*' any host). Loopback by default: a foreign Host "
        "(DNS rebinding) gets a 400. Add the public name when a proxy forwards it.")
    trusted_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins (scheme://host[:port]) besides the dashboard's own that may "
        "send state-changing requests, e.g. a proxy's public origin when it rewrites Host.")
    max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1024, description="Largest request body; "
                                "larger ones get a 413.")
    interactive_queue_per_run: int = Field(default=8, ge=1, description="Interactive jobs (ablate, attribute, "
                                           "lens) that may wait in the queue per run; more get a 429.")
    interactive_queue_total: int = Field(default=32, ge=1, description="Interactive jobs that may wait in "
                                         "the queue in all; more get a 429.")
    # --- workers ----------------------------------------------------------------------------------------------
    lease_s: float = Field(default=60.0, ge=1.0, description="Seconds a claimed job stays a worker's without a "
                           "heartbeat (renewed every third); a dead worker's job is claimable again after it.")
    torch_threads: int | None = Field(default=None, ge=1, description="torch intra-op threads of a worker "
                                      "(unset: torch's default, every core). `up` sets it per worker class.")
    # --- feature labels: the LLM judge (app/labels/llm.py; README "Feature labels") ----------------------------
    label_llm_url: str | None = Field(default=None, description="Base URL of an OpenAI-compatible chat endpoint "
                                      "for `adapterlens label --labeler llm`, e.g. http://localhost:8000/v1 "
                                      "(POST {url}/chat/completions).")
    label_llm_model: str | None = Field(default=None, description="Model name sent to that endpoint; it is also "
                                        "the labels' source.")
    label_llm_key: SecretStr | None = Field(default=None, description="Bearer key for that endpoint (optional).")
    label_llm_batch: int = Field(default=8, ge=1, le=512, description="Features labelled per batch (one "
                                 "transaction; a crash loses at most one batch).")
    label_llm_rps: float = Field(default=2.0, gt=0, description="Most requests per second sent to the endpoint.")
    label_llm_retries: int = Field(default=5, ge=0, le=20, description="Retries of a request answered 429 or 5xx "
                                   "(or not answered), with exponential backoff.")
    label_llm_timeout_s: float = Field(default=60.0, gt=0, description="Seconds one request may take.")

    @field_validator("allowed_hosts", "trusted_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        """Accept ``a,b`` (the environment's form) as well as a list."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

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
