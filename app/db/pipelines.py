"""A user's own model pair as a run, and its pipeline (train → collect → evaluate → hesitation) as queued jobs.

Torch-free: the CLI (``adapterlens pipeline --base B --target T --data texts.jsonl``, ``train``) and the
web API (``POST /api/pipelines``) build the same run config here. The run keeps everything its jobs read
(``runs.config``): the training config, its data (texts, held-out split or file, prompts), its hesitation
words and, when given, its chat format.

The API is unauthenticated, so a request from it may name only models and files on the worker's disk
under the data directory or a directory of ``Settings.api_allowed_paths``, and Hugging Face ids listed in
``Settings.api_allowed_models`` (:func:`check_request_paths`); anything else is refused before anything is
stored. The CLI, run by the machine's user, may name any path.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import queue
from app.db.schema import Run
from app.settings import Settings
from training.chat import ChatFormat, ChatFormatError
from training.config import apply_overrides, load_train_config, preset, train_config_to_dict
from training.hesitation import HesitationWordsError, normalize_words

log = logging.getLogger(__name__)

PIPELINE_STEPS = ("train", "collect", "evaluate", "hesitation")  # collect first: the feature pages sooner
PIPELINE_PRIORITY = 0  # batch work, like the demo pipeline
DEFAULT_PRESET = "organism"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PipelineRequestError(ValueError):
    """A pipeline request that cannot be served; ``status_code`` is the HTTP answer (400, 403, 404, 409)."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = status_code


class PipelineRequest(BaseModel):
    """A user's pair and data: what ``adapterlens pipeline --base --target --data`` and the API take."""

    base: str = Field(min_length=1, max_length=500, description="Base model (MLP donor): a directory or a Hub id.")
    target: str = Field(min_length=1, max_length=500, description="Target (reasoning) model: a directory or a Hub id.")
    data: str = Field(min_length=1, max_length=1000, description="JSONL of {\"text\"}: the target's chat-formatted "
                                                                   "traces, trained on (minus the held-out split).")
    prompts: str | None = Field(None, max_length=1000, description="JSONL of {\"prompt\", \"answer\"?}: evaluation "
                                "and hesitation-study prompts (default: the prompts of the texts).")
    eval_data: str | None = Field(None, max_length=1000, description="JSONL of held-out {\"text\"} (default: a "
                                  "split of --data).")
    name: str | None = Field(None, pattern=NAME_PATTERN, description="Run name (default: from the target and preset).")
    preset: str = Field(DEFAULT_PRESET, description="Training preset: organism, organism-tiny, paper-7b.")
    overrides: list[str] = Field(default_factory=list, max_length=64,
                                 description="Training config overrides, key=value (lr=1e-3, adapter.n_features=1024).")
    hesitation_words: list[str] | None = Field(None, description="The run's hesitation words (default: "
                                               "Wait, wait, Hmm, Actually, But).")
    chat_format: str | None = Field(None, max_length=2000, description="Prompt template with one {prompt} "
                                    "(default: the tokenizer's chat template).")
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of --data held out when no --eval-data.")
    n_prompts: int = Field(300, ge=1, le=100_000, description="Evaluation prompts.")
    n_graphs: int = Field(24, ge=1, le=500, description="Hesitation-study graphs.")
    max_new_tokens: int = Field(96, ge=1, le=4096, description="Tokens generated per prompt (evaluation, study).")

    @field_validator("hesitation_words")
    @classmethod
    def _words(cls, words: list[str] | None) -> list[str] | None:
        if words is None:
            return None
        try:
            return list(normalize_words(words))
        except HesitationWordsError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("chat_format")
    @classmethod
    def _chat(cls, template: str | None) -> str | None:
        if template is not None:
            try:
                ChatFormat(template, "given")
            except ChatFormatError as exc:
                raise ValueError(str(exc)) from None
        return template


def parse_request(data: PipelineRequest | dict[str, Any]) -> PipelineRequest:
    if isinstance(data, PipelineRequest):
        return data
    try:
        return PipelineRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        raise PipelineRequestError(f"{where}: {first.get('msg', 'invalid')}", 422) from None


# -- paths the API may name ------------------------------------------------------------------------------

def looks_like_hub_id(spec: str) -> bool:
    """``org/name`` that is not a path on this machine."""
    return bool(_HUB_ID.match(spec)) and not Path(spec).exists()


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def allowed_roots(settings: Settings) -> list[Path]:
    """The directories whose files the API may name: the data directory and the allow-list."""
    return [settings.resolved_data_dir, *(Path(p).expanduser().resolve() for p in settings.api_allowed_paths)]


def resolve_api_path(value: str, settings: Settings, what: str, *, directory: bool = False) -> str:
    """An absolute path inside an allowed root (relative paths are taken from the data directory), which
    exists; a PipelineRequestError (403 outside, 404 missing) otherwise. Symbolic links are followed first,
    so a link under the data directory cannot point out of it."""
    raw = Path(value).expanduser()
    path = (raw if raw.is_absolute() else settings.resolved_data_dir / raw).resolve()
    if not _inside(path, allowed_roots(settings)):
        raise PipelineRequestError(
            f"{what} {value!r} is outside the data directory and the allowed paths; the API may only name files "
            "under them (set ADAPTERLENS_API_ALLOWED_PATHS to allow more)", 403)
    if directory and not (path / "config.json").is_file():
        raise PipelineRequestError(f"{what} {value!r}: no model directory (with config.json) at {path}", 404)
    if not directory and not path.is_file():
        raise PipelineRequestError(f"{what} {value!r}: no file at {path}", 404)
    return str(path)


def _model_allowed(spec: str, settings: Settings) -> bool:
    for pattern in settings.api_allowed_models:
        if spec == pattern or (pattern.endswith("/*") and spec.startswith(pattern[:-1])):
            return True
    return False


def check_request_paths(req: PipelineRequest, settings: Settings) -> PipelineRequest:
    """The request with every path made absolute and checked against the allow-list (an API request)."""
    updates: dict[str, Any] = {}
    for key, what in (("base", "base model"), ("target", "target model")):
        spec = getattr(req, key)
        raw = Path(spec).expanduser()
        on_disk = (raw if raw.is_absolute() else settings.resolved_data_dir / raw).exists()
        if _HUB_ID.match(spec) and not on_disk:  # org/name that is no directory under the data directory
            if not _model_allowed(spec, settings):
                raise PipelineRequestError(
                    f"{what} {spec!r} is a Hugging Face id not in the allowed models (ADAPTERLENS_API_ALLOWED_MODELS)",
                    403)
            continue
        updates[key] = resolve_api_path(spec, settings, what, directory=True)
    for key, what in (("data", "data file"), ("prompts", "prompts file"), ("eval_data", "held-out texts file")):
        if getattr(req, key) is not None:
            updates[key] = resolve_api_path(getattr(req, key), settings, what)
    return req.model_copy(update=updates)


# -- the run and its jobs --------------------------------------------------------------------------------

def run_name(req: PipelineRequest) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(req.target.rstrip("/")).name).strip("-.") or "run"
    return req.name or f"{stem}-{req.preset}"[:200]


def run_config(req: PipelineRequest, *, config_file: str | Path | None = None) -> dict[str, Any]:
    """The run config a request describes (training config resolved: preset, YAML file, overrides)."""
    try:
        cfg = load_train_config(config_file, preset_name=req.preset, overrides=req.overrides) if config_file \
            else apply_overrides(preset(req.preset), req.overrides)
    except ValueError as exc:
        raise PipelineRequestError(str(exc)) from None
    data: dict[str, Any] = {"kind": "jsonl", "path": str(Path(req.data).expanduser().resolve())}
    if req.eval_data:
        data["eval_path"] = str(Path(req.eval_data).expanduser().resolve())
    else:
        data["heldout"] = {"fraction": req.heldout_fraction, "max": 500, "seed": 0}
    if req.prompts:
        data["prompts_path"] = str(Path(req.prompts).expanduser().resolve())
    config: dict[str, Any] = {"train": train_config_to_dict(cfg), "data": data, "preset": req.preset}
    if req.hesitation_words:
        config["hesitation_words"] = list(req.hesitation_words)
    if req.chat_format:
        config["chat"] = ChatFormat(req.chat_format, "given").to_config()
    return config


def _model_spec(spec: str) -> str:
    """A local model path made absolute (so jobs find it from any working directory); a Hub id as is."""
    return spec if looks_like_hub_id(spec) else str(Path(spec).expanduser().resolve())


def create_run(session: Session, req: PipelineRequest, *, config_file: str | Path | None = None,
               reuse: bool = True) -> int:
    """The run of a request: created (status ``created``), or the existing run of that name when it is the
    same pair and data (``reuse``; a resumed pipeline). A name taken by another pair is a 409."""
    name = run_name(req)
    config = run_config(req, config_file=config_file)
    base, target = _model_spec(req.base), _model_spec(req.target)
    run = session.scalar(select(Run).where(Run.name == name))
    if run is not None:
        same = (run.base_model, run.target_model, (run.config or {}).get("data", {}).get("path")) == \
            (base, target, config["data"]["path"])
        if reuse and same:
            return run.id
        raise PipelineRequestError(f"a run named {name!r} exists with another pair or data; choose another name", 409)
    run = Run(name=name, base_model=base, target_model=target, config=config, status="created")
    session.add(run)
    session.flush()
    return run.id


def step_payloads(req: PipelineRequest, run_id: int) -> dict[str, dict[str, Any]]:
    """Each pipeline step's job payload."""
    return {"train": {"run_id": run_id},
            "collect": {"run_id": run_id},  # before evaluate: the feature pages exist once it is done
            "evaluate": {"run_id": run_id, "n_prompts": req.n_prompts, "max_new_tokens": req.max_new_tokens},
            "hesitation": {"run_id": run_id, "n_graphs": req.n_graphs, "max_new_tokens": req.max_new_tokens}}


def submit_pipeline(session: Session, data: PipelineRequest | dict[str, Any], settings: Settings | None = None,
                    ) -> tuple[int, dict[str, int]]:
    """Create the run and queue its pipeline (each job waits for the one before), in the session's transaction.

    With ``settings`` the request is checked as an API request (:func:`check_request_paths`).
    Returns (run id, {step: job id}).
    """
    req = parse_request(data)
    if settings is not None:
        req = check_request_paths(req, settings)
    run_id = create_run(session, req, reuse=False)
    jobs: dict[str, int] = {}
    previous = None
    for step, payload in step_payloads(req, run_id).items():
        previous = queue.enqueue(session, step, payload, priority=PIPELINE_PRIORITY, depends_on=previous,
                                 run_id=run_id)
        jobs[step] = previous
    log.info("queued the pipeline of run %d: %s", run_id, jobs)
    return run_id, jobs

