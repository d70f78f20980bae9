"""Ablation and experiment requests: the payload models, their validation against the store, and submission.

A request names a run, a prompt (free text, a stored prompt, or a stored feature example), the features
(an explicit ``(layer, index)`` list, a stored feature set, every feature of some layers, or the
complement of all that), a mode (zero, scale by a factor, clamp to a value: steering is a factor > 1 or a
clamp above the feature's natural value), the positions it applies to, and generation settings.

:func:`submit_ablation` validates a request against the store, stores the *resolved* request (the feature
set snapshotted into explicit pairs, stored token ids copied) in ``ablations`` and queues an ``ablate``
job in the same transaction, so a refused request stores nothing. Every refusal is an
:class:`AblationRequestError` whose message names the offending value and whose ``status_code`` is what
an HTTP route answers (404 for a missing run, set, prompt or example; 422 for the rest).

Torch-free on purpose: the web app imports this module (design.md: ``app/`` never imports torch).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db import queue
from app.db.schema import (
    Ablation,
    Example,
    Experiment,
    FeatureSet,
    FeatureSetMember,
    Job,
    JobStatus,
    Prompt,
    Run,
)
from app.db.text import text_problem

log = logging.getLogger(__name__)

ABLATE_PRIORITY = 100  # interactive: claimed before any batch job
EXPERIMENT_PRIORITY = 0  # batch, like the pipeline's jobs
SCALE_RANGE = (-20.0, 20.0)  # allowed factors of mode "scale" (steering: > 1)
CLAMP_LIMIT = 1e4  # |value| bound of mode "clamp" (activations of trained adapters are O(1..100))
MAX_TEMPERATURE = 5.0
MAX_PROMPT_CHARS = 100_000  # free text beyond this is refused before tokenizing
MAX_PROMPT_TOKENS = 100_000  # explicit token ids per prompt
MAX_ID = 2**31 - 1  # ids are 32-bit integers in the store
MAX_EXPERIMENT_PROMPTS = 10_000
MAX_INDEX = 2**31 - 1  # layers and feature indices

DbId = Annotated[int, Field(ge=1, le=MAX_ID)]
Index = Annotated[int, Field(ge=0, le=MAX_INDEX)]
Mode = Literal["zero", "scale", "clamp"]
Positions = Literal["all", "prompt", "generated"]
Compare = Literal["target", "hybrid"]


class AblationRequestError(ValueError):
    """Bad input in an ablation or experiment request; ``status_code`` is the HTTP answer (404, 422, or 429
    with ``retry_after`` seconds when too much interactive work is waiting)."""

    def __init__(self, message: str, status_code: int = 422, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None


@dataclass(frozen=True)
class AblationLimits:
    """Configurable bounds (``Settings.ablation_max_new_tokens``, ``interactive_queue_per_run``/``_total``)."""

    max_new_tokens: int = 512
    queue_per_run: int = 8  # interactive jobs waiting for one run, at most
    queue_total: int = 32  # interactive jobs waiting in all, at most

    @classmethod
    def from_settings(cls, settings: Any) -> AblationLimits:
        return cls(max_new_tokens=settings.ablation_max_new_tokens, queue_per_run=settings.interactive_queue_per_run,
                   queue_total=settings.interactive_queue_total)


class GenerationOptions(BaseModel):
    """Generation settings shared by every condition: greedy when ``temperature`` is 0, else seeded sampling."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=MAX_TEMPERATURE)
    seed: int = Field(0, ge=0, le=2**63 - 1)


class FeatureSelection(BaseModel):
    """Which features an intervention touches: the union of ``features``, the stored set and whole ``layers``.

    ``complement``: touch every feature *except* the selection (keep only the selection's contribution).
    ``roles``: with ``feature_set``, only members with one of these roles (e.g. ``["output"]``).
    """

    model_config = ConfigDict(extra="forbid")

    features: list[tuple[Index, Index]] = Field(default_factory=list)
    feature_set: Annotated[str, Field(max_length=200)] | DbId | None = None
    roles: list[Annotated[str, Field(max_length=100)]] | None = None
    layers: list[Index] = Field(default_factory=list)
    complement: bool = False

    @model_validator(mode="before")
    @classmethod
    def _storable_text(cls, data: Any) -> Any:
        """Refuse NUL and lone surrogates in any text of the request, before anything else looks at it."""
        _check_text(data, ())
        return data

    @model_validator(mode="after")
    def _some_selection(self) -> FeatureSelection:
        if not self.features and self.feature_set is None and not self.layers and not self.complement:
            raise ValueError("select some features: give features, feature_set or layers")
        if self.roles is not None and self.feature_set is None:
            raise ValueError("roles filter the members of a feature_set; give feature_set too")
        return self


class InterventionSpec(FeatureSelection):
    mode: Mode = "zero"
    value: float | None = None
    positions: Positions = "all"

    @model_validator(mode="after")
    def _value_fits_mode(self) -> InterventionSpec:
        if self.mode == "zero":
            return self
        if self.value is None or not math.isfinite(self.value):
            raise ValueError(f"mode {self.mode!r} needs a finite value, got {self.value!r}")
        if self.mode == "scale" and not SCALE_RANGE[0] <= self.value <= SCALE_RANGE[1]:
            raise ValueError(f"scale factor {self.value} is out of range [{SCALE_RANGE[0]}, {SCALE_RANGE[1]}]")
        if self.mode == "clamp" and abs(self.value) > CLAMP_LIMIT:
            raise ValueError(f"clamp value {self.value} is out of range [-{CLAMP_LIMIT:g}, {CLAMP_LIMIT:g}]")
        return self


class AblationRequest(InterventionSpec):
    """One interactive ablation/steering request (what a page's form posts).

    The prompt is one of: free ``prompt`` text (the worker puts it in the run's chat format unless ``chat``
    is off or it is already in that format), a stored ``prompt_id`` or feature ``example_id`` (their token
    ids, never re-tokenized), or explicit ``token_ids``. ``target_token_id`` names a token whose probability
    the result reports before and after the intervention (a graph's explained token).
    """

    run_id: int = Field(ge=1, le=MAX_ID)
    prompt: str | None = None  # free text
    prompt_id: int | None = Field(None, ge=1, le=MAX_ID)  # a stored prompt: its token ids
    example_id: int | None = Field(None, ge=1, le=MAX_ID)  # a stored feature example: its ids up to its focus
    token_ids: list[int] | None = Field(None, max_length=MAX_PROMPT_TOKENS)  # explicit token ids
    prompt_tokens: int | None = Field(None, ge=1, le=MAX_PROMPT_TOKENS)  # with stored/explicit ids: the first N
    chat: bool = True  # free text: put it in the run's chat format (thinking opened) in the worker
    answer: str | None = None  # the known answer, if any (a stored prompt's is used otherwise)
    target_token_id: int | None = Field(None, ge=0, le=MAX_ID)
    generation: GenerationOptions = Field(default_factory=GenerationOptions)
    compare: list[Compare] = Field(default_factory=list)  # also generate with the target / the hybrid

    @field_validator("prompt", mode="after")
    @classmethod
    def _unix_newlines(cls, v: str | None) -> str | None:
        """Browsers submit a textarea's newlines as CRLF; models saw LF."""
        return v.replace("\r\n", "\n").replace("\r", "\n") if v is not None else None

    @model_validator(mode="after")
    def _one_prompt(self) -> AblationRequest:
        given = [n for n in ("prompt", "prompt_id", "example_id", "token_ids") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of prompt, prompt_id, example_id, token_ids (got {given or 'none'})")
        if self.token_ids is not None and (not self.token_ids or any(not 0 <= t <= MAX_ID for t in self.token_ids)):
            raise ValueError("token_ids must be a non-empty list of token ids")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("the prompt is empty")
        if self.prompt is not None and len(self.prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"the prompt has {len(self.prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
        return self


def _check_text(data: Any, where: tuple[str, ...]) -> None:
    """Raise ValueError naming the first string in ``data`` (dicts, lists, nested) that cannot be stored."""
    if isinstance(data, str):
        problem = text_problem(data)
        if problem:
            raise ValueError(f"{'.'.join(where) or 'the text'} {problem}")
    elif isinstance(data, dict):
        for key, value in data.items():
            _check_text(key, where)
            _check_text(value, (*where, str(key)[:40]))
    elif isinstance(data, list | tuple):
        for i, value in enumerate(data):
            _check_text(value, (*where, str(i)))


class PromptItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    answer: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _storable_text(cls, data: Any) -> Any:
        _check_text(data, ())
        return data


class ExperimentRequest(InterventionSpec):
    """The same intervention over a prompt set, giving per-condition distributions.

    ``design="necessity"``: the adapted model with and without the intervention (conditions ``unablated``,
    ``ablated``). ``design="sufficiency"``: only the selection's features kept on top of the hybrid
    (``Intervention(complement=True)`` zeroes every other feature; conditions ``unablated``, ``set-only``,
    ``hybrid``). Prompts: exactly one of ``items``, ``jsonl`` (a file on the worker's machine, one
    ``{"prompt", "answer"}`` object per line), ``prompt_ids`` (stored prompts) or ``organism_heldout``
    (N held-out problems of the run's organism, taken in turn from each task family; 0 = all).
    """

    run_id: DbId
    name: str = Field(..., min_length=1, max_length=200)
    design: Literal["necessity", "sufficiency"] = "necessity"
    items: list[PromptItem] | None = None
    jsonl: str | None = None
    prompt_ids: list[DbId] | None = None
    organism_heldout: int | None = Field(None, ge=0)
    chat: bool = True
    generation: GenerationOptions = Field(default_factory=lambda: GenerationOptions(max_new_tokens=96))
    batch_size: int = Field(16, ge=1, le=256)  # prompts generated together (left-padded) per condition group
    compare: list[Compare] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_source(self) -> ExperimentRequest:
        given = [n for n in ("items", "jsonl", "prompt_ids", "organism_heldout") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one prompt source of items, jsonl, prompt_ids, organism_heldout "
                             f"(got {given or 'none'})")
        n = len(self.items or self.prompt_ids or [])
        if n > MAX_EXPERIMENT_PROMPTS or (self.organism_heldout or 0) > MAX_EXPERIMENT_PROMPTS:
            raise ValueError(f"an experiment takes at most {MAX_EXPERIMENT_PROMPTS} prompts")
        if (self.items is not None or self.prompt_ids is not None) and n == 0:
            raise ValueError("the prompt list is empty")
        return self


class ResolvedSelection(BaseModel):
    """A selection snapshotted at submission: explicit pairs and whole layers (no reference to a stored set)."""

    features: list[tuple[int, int]]
    all_layers: list[int]
    complement: bool
    mode: Mode
    value: float
    positions: Positions


class ResolvedAblation(BaseModel):
    """What ``ablations.request`` stores and the ``ablate`` handler runs."""

    request: AblationRequest
    selection: ResolvedSelection
    prompt_ids: list[int] | None  # token ids when the prompt came from the store or was given as ids
    prompt_text: str | None  # free text as the user wrote it (the worker applies the run's chat format)
    answer: str | None


class ResolvedExperiment(BaseModel):
    request: ExperimentRequest
    selection: ResolvedSelection


# -------------------------------------------------------------------------------------- validation


def _parse(model: type[BaseModel], data: BaseModel | dict) -> Any:
    if isinstance(data, model):
        data = data.model_dump()
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors())
        raise AblationRequestError(f"invalid {model.__name__}: {problems}") from None


def _run(session: Session, run_id: int) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise AblationRequestError(f"unknown run {run_id}", 404)
    return run


def resolve_selection(session: Session, run: Run, spec: InterventionSpec) -> ResolvedSelection:
    """Check every feature against the run's geometry and snapshot a stored set into explicit pairs."""
    pairs = {(int(a), int(b)) for a, b in spec.features}
    if spec.feature_set is not None:
        by = FeatureSet.id if isinstance(spec.feature_set, int) else FeatureSet.name
        fs = session.scalars(select(FeatureSet).where(FeatureSet.run_id == run.id, by == spec.feature_set)).first()
        if fs is None:
            raise AblationRequestError(f"unknown feature set {spec.feature_set!r} in run {run.id}", 404)
        query = select(FeatureSetMember.layer, FeatureSetMember.index).where(FeatureSetMember.set_id == fs.id)
        if spec.roles is not None:
            query = query.where(FeatureSetMember.role.in_(spec.roles))
        members = {(int(a), int(b)) for a, b in session.execute(query)}
        if not members:
            raise AblationRequestError(f"feature set {fs.name!r} has no members"
                                       + (f" with roles {spec.roles}" if spec.roles is not None else ""))
        pairs |= members
    n_layers, n_features = run.n_layers, run.n_features
    for layer in spec.layers:
        if n_layers is not None and not 0 <= layer < n_layers:
            raise AblationRequestError(f"unknown layer {layer}: run {run.id} has layers 0..{n_layers - 1}")
    for layer, index in sorted(pairs):
        if not run.has_feature(layer, index):
            raise AblationRequestError(
                f"unknown feature ({layer}, {index}): run {run.id} has {n_layers} layers × {n_features} features")
    return ResolvedSelection(features=sorted(pairs), all_layers=sorted(set(spec.layers)), complement=spec.complement,
                             mode=spec.mode, value=0.0 if spec.value is None else float(spec.value),
                             positions=spec.positions)


def _check_generation(gen: GenerationOptions, limits: AblationLimits) -> None:
    if gen.max_new_tokens > limits.max_new_tokens:
        raise AblationRequestError(f"max_new_tokens {gen.max_new_tokens} is over the limit of "
                                   f"{limits.max_new_tokens} (setting ablation_max_new_tokens)")


def check_prompt_length(n_tokens: int, context_length: int | None) -> None:
    """Refuse a prompt that leaves no room to generate in the model's context."""
    if context_length is not None and n_tokens >= context_length:
        raise AblationRequestError(f"the prompt has {n_tokens} tokens; the model's context is {context_length} "
                                   "tokens and generation needs at least one more")


def validate_ablation(session: Session, data: AblationRequest | dict, *, limits: AblationLimits = AblationLimits(),
                      encode: Callable[[str], Sequence[int]] | None = None,
                      context_length: int | None = None) -> ResolvedAblation:
    """Validate ``data`` against the store; ``encode`` and ``context_length`` (when known) check the length.

    Without ``encode`` a free-text prompt's length is checked by the worker, which fails the job with the
    same message.
    """
    req: AblationRequest = _parse(AblationRequest, data)
    run = _run(session, req.run_id)
    _check_generation(req.generation, limits)
    selection = resolve_selection(session, run, req)
    prompt_ids: list[int] | None = None
    prompt_text: str | None = None
    answer = req.answer
    if req.prompt_id is not None:
        row = session.get(Prompt, req.prompt_id)
        if row is None or row.run_id != run.id:
            raise AblationRequestError(f"unknown prompt {req.prompt_id} in run {run.id}", 404)
        prompt_ids = [int(t) for t in row.token_ids]
        answer = answer if answer is not None else row.answer
    elif req.example_id is not None:
        ex = session.get(Example, req.example_id)
        if ex is None or ex.run_id != run.id:
            raise AblationRequestError(f"unknown example {req.example_id} in run {run.id}", 404)
        prompt_ids = [int(t) for t in ex.token_ids[:ex.focus + 1]]
    elif req.token_ids is not None:
        prompt_ids = list(req.token_ids)
    else:
        prompt_text = req.prompt  # formatted by the worker, with the run's tokenizer
    if prompt_ids is not None and req.prompt_tokens is not None:
        prompt_ids = prompt_ids[:req.prompt_tokens]
    if prompt_ids is not None and not prompt_ids:
        raise AblationRequestError("the stored prompt has no tokens")
    if prompt_ids is not None:
        check_prompt_length(len(prompt_ids), context_length)
    elif encode is not None:  # the raw text's length: the worker checks the formatted prompt exactly
        check_prompt_length(len(encode(prompt_text)), context_length)
    return ResolvedAblation(request=req, selection=selection, prompt_ids=prompt_ids, prompt_text=prompt_text,
                            answer=answer)


def validate_experiment(session: Session, data: ExperimentRequest | dict, *,
                        limits: AblationLimits = AblationLimits()) -> ResolvedExperiment:
    req: ExperimentRequest = _parse(ExperimentRequest, data)
    run = _run(session, req.run_id)
    _check_generation(req.generation, limits)
    if req.design == "sufficiency" and (req.complement or req.mode != "zero"):
        raise AblationRequestError("the sufficiency design zeroes every feature outside the selection itself; "
                                   "leave mode at zero and complement off")
    selection = resolve_selection(session, run, req)
    if req.prompt_ids is not None:
        found = set(session.scalars(select(Prompt.id).where(Prompt.run_id == run.id, Prompt.id.in_(req.prompt_ids))))
        missing = [p for p in req.prompt_ids if p not in found]
        if missing:
            raise AblationRequestError(f"unknown prompt(s) {missing[:10]} in run {run.id}", 404)
    if req.jsonl is not None:
        load_jsonl(req.jsonl)  # refuse a missing or malformed file now, not in the worker
    if req.organism_heldout is not None and not _is_organism(run.target_model):
        raise AblationRequestError(f"run {run.id}'s target {run.target_model!r} is not an organism, so it has no "
                                   "held-out problems; give items, jsonl or prompt_ids instead")
    return ResolvedExperiment(request=req, selection=selection)


def _is_organism(target_model: str) -> bool:
    """An ``organism:<preset>:s<seed>`` spec, or a local model directory beside an ``organism.json``."""
    if target_model.startswith("organism:"):
        return True
    path = Path(target_model).expanduser()
    return (path / "organism.json").is_file() or (path.parent / "organism.json").is_file()


def load_jsonl(path: str) -> list[PromptItem]:
    """Prompt items from a JSONL file (``{"prompt": ..., "answer": ...}`` per line; blank lines skipped)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise AblationRequestError(f"no prompt file at {path}", 404)
    items = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(PromptItem.model_validate(json.loads(line)))
        except (ValueError, ValidationError) as exc:
            raise AblationRequestError(f"{path} line {n} is not a {{\"prompt\", \"answer\"}} object: {exc}") from None
    if not items:
        raise AblationRequestError(f"{path} holds no prompts")
    if len(items) > MAX_EXPERIMENT_PROMPTS:
        raise AblationRequestError(f"{path} holds {len(items)} prompts; the limit is {MAX_EXPERIMENT_PROMPTS}")
    return items


# -------------------------------------------------------------------------------------- submission


RETRY_AFTER_DEFAULT_S = 5  # Retry-After when no interactive job has finished yet to time
RETRY_AFTER_MAX_S = 300
RECENT_JOBS_TIMED = 20  # finished interactive jobs whose durations estimate Retry-After


def check_interactive_room(session: Session, run_id: int, limits: AblationLimits) -> None:
    """Refuse (429) a new interactive request when too many wait already, for this run or in all.

    Waiting means ``todo`` (running ones are bounded by the workers). Retry-After is the median duration of
    recent interactive jobs times the excess, so a client that waits that long finds room. Two submissions
    racing may both pass: the bound holds to within the number of concurrent requests.
    """
    waiting = (select(func.count()).select_from(Job)
               .where(Job.kind.in_(queue.INTERACTIVE_KINDS), Job.status == JobStatus.TODO))
    total = session.scalar(waiting) or 0
    per_run = session.scalar(waiting.where(Job.run_id == run_id)) or 0
    if per_run < limits.queue_per_run and total < limits.queue_total:
        return
    excess = max(per_run - limits.queue_per_run, total - limits.queue_total) + 1
    recent = session.execute(
        select(Job.started, Job.finished).where(Job.kind.in_(queue.INTERACTIVE_KINDS), Job.status == JobStatus.SUCCEEDED,
                                                Job.started.is_not(None), Job.finished.is_not(None))
        .order_by(Job.id.desc()).limit(RECENT_JOBS_TIMED)).all()
    durations = sorted((f - s).total_seconds() for s, f in recent)
    typical = durations[len(durations) // 2] if durations else RETRY_AFTER_DEFAULT_S
    retry_after = int(min(RETRY_AFTER_MAX_S, max(1, math.ceil(typical * excess))))
    which = (f"{per_run} for this run (limit {limits.queue_per_run})" if per_run >= limits.queue_per_run
             else f"{total} in all (limit {limits.queue_total})")
    raise AblationRequestError(f"too many interactive requests are waiting: {which}; try again in {retry_after} s",
                               429, retry_after=retry_after)


def submit_ablation(session: Session, data: AblationRequest | dict, *, limits: AblationLimits = AblationLimits(),
                    encode: Callable[[str], Sequence[int]] | None = None,
                    context_length: int | None = None) -> tuple[int, int]:
    """Validate, store and queue an ablation in the caller's transaction; returns ``(ablation_id, job_id)``.

    Nothing is written when validation fails. The caller commits (the job's NOTIFY fires on commit).
    """
    resolved = validate_ablation(session, data, limits=limits, encode=encode, context_length=context_length)
    check_interactive_room(session, resolved.request.run_id, limits)
    row = Ablation(run_id=resolved.request.run_id, status="todo", request=resolved.model_dump(mode="json"))
    session.add(row)
    session.flush()
    row.job_id = queue.enqueue(session, "ablate", {"ablation_id": row.id}, priority=ABLATE_PRIORITY,
                               run_id=row.run_id, max_attempts=2)
    session.flush()
    log.info("ablation %s queued as job %s", row.id, row.job_id)
    return row.id, row.job_id


def submit_experiment(session: Session, data: ExperimentRequest | dict, *,
                      limits: AblationLimits = AblationLimits()) -> tuple[int, int]:
    """Validate, store and queue an experiment (batch priority); returns ``(experiment_id, job_id)``."""
    resolved = validate_experiment(session, data, limits=limits)
    row = Experiment(run_id=resolved.request.run_id, name=resolved.request.name, status="todo",
                     request=resolved.model_dump(mode="json"))
    session.add(row)
    session.flush()
    row.job_id = queue.enqueue(session, "experiment", {"experiment_id": row.id}, priority=EXPERIMENT_PRIORITY,
                               run_id=row.run_id)
    session.flush()
    log.info("experiment %s queued as job %s", row.id, row.job_id)
    return row.id, row.job_id
