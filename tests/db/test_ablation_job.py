"""Ablations and experiments through the store and the queue, on SQLite and Postgres, with a real worker."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from app.db import queue
from app.db.requests import (
    ABLATE_PRIORITY,
    AblationLimits,
    AblationRequestError,
    GenerationOptions,
    ResolvedAblation,
    submit_ablation,
    submit_experiment,
)
from app.db.schema import (
    Ablation,
    AblationToken,
    Experiment,
    ExperimentRow,
    FeatureSet,
    FeatureSetMember,
    Job,
    JobStatus,
    Prompt,
    Run,
)
from app.db.session import make_engine
from app.settings import Settings
from tests.helpers import randomize_adapters, tiny_qwen2
from training.adapter import AdapterModel, build_adapter_model
from training.chat import format_prompt
from training.config import AdapterConfig
from training.interventions import Intervention
from training.organism.tasks import corpus
from training.organism.tokenizer import train_tokenizer
from worker.ablation.generate import ABLATED, UNABLATED, ablation_tracks, collect, lockstep
from worker.ablation.job import build_interventions, encode, sampling_settings, use_model_loader
from worker.loop import run_worker

N_FEATURES = 16
SET_MEMBERS = [(0, 1, "output"), (0, 5, "template"), (1, 3, "output"), (1, 7, "output")]
JOB_MODULES = ["worker.ablation.job"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus(0, 60))


@pytest.fixture(scope="module")
def model(tokenizer) -> AdapterModel:
    """A tiny adapter model over the organism tokenizer that never says eos and has a long context."""
    vocab = len(tokenizer)
    base, target = tiny_qwen2(0, vocab=vocab), tiny_qwen2(1, vocab=vocab)
    m = randomize_adapters(build_adapter_model(base, target, AdapterConfig(n_features=N_FEATURES)), 0)
    with torch.no_grad():  # eos logit 0, below the max of ~300 random logits: generations run to the limit
        m.hf.lm_head.weight[tokenizer.eos_token_id].zero_()
    m.hf.config.max_position_embeddings = 4096
    return m


@pytest.fixture
def engine(db_engine: Engine) -> Engine:
    return db_engine


@pytest.fixture
def run_id(engine: Engine) -> int:
    with Session(engine) as s, s.begin():
        run = Run(
            name="tiny", base_model="b", target_model="t", n_layers=2, n_features=N_FEATURES, d_model=32
        )
        s.add(run)
        s.flush()
        fs = FeatureSet(run_id=run.id, name="hesitation features")
        s.add(fs)
        s.flush()
        s.add_all([FeatureSetMember(set_id=fs.id, layer=a, index=b, role=r) for a, b, r in SET_MEMBERS])
        return run.id


@pytest.fixture
def loaded(model, tokenizer) -> Iterator[None]:
    with use_model_loader(lambda ctx, run_id: (model, tokenizer)):
        yield


def _submit(engine: Engine, request: dict, **kw) -> tuple[int, int]:
    with Session(engine) as s, s.begin():
        return submit_ablation(s, request, **kw)


def _work(settings: Settings) -> int:
    return run_worker(settings, wait=False, handler_modules=JOB_MODULES, migrate=False)


def _count(engine: Engine, model) -> int:
    with Session(engine) as s:
        return s.scalar(select(func.count()).select_from(model))


def _tokens(engine: Engine, ablation_id: int, condition: str) -> list[AblationToken]:
    with Session(engine) as s:
        return list(
            s.scalars(
                select(AblationToken)
                .where(AblationToken.ablation_id == ablation_id, AblationToken.condition == condition)
                .order_by(AblationToken.step)
            )
        )


# ------------------------------------------------------------------------------------------ ablate


def test_ablation_runs_through_the_queue(engine, db_settings, run_id, loaded, model, tokenizer):
    request = {
        "run_id": run_id,
        "prompt": "47 + 38 = ?",
        "feature_set": "hesitation features",
        "roles": ["output"],
        "mode": "scale",
        "value": 6.0,
        "answer": "85",
        "generation": {"max_new_tokens": 12, "temperature": 0.8, "seed": 5},
        "compare": ["hybrid", "target"],
    }
    ablation_id, job_id = _submit(engine, request)
    with Session(engine) as s:
        job = s.get(Job, job_id)
        stored = ResolvedAblation.model_validate(s.get(Ablation, ablation_id).request)
    assert job.priority == ABLATE_PRIORITY and job.kind == "ablate"
    assert stored.selection.features == [(0, 1), (1, 3), (1, 7)]  # the set snapshotted, roles applied

    assert _work(db_settings) == 1
    with Session(engine) as s:
        ab = s.get(Ablation, ablation_id)
        assert queue.get_job(engine, job_id).status is JobStatus.SUCCEEDED
    assert ab.status == "done" and ab.finished is not None
    # the job's tokens are exactly a direct lockstep run with the same seed and settings
    ids = encode(tokenizer, format_prompt("47 + 38 = ?"))
    settings = sampling_settings(stored.request.generation, model, tokenizer)
    direct = collect(
        lockstep(model, ids, ablation_tracks(build_interventions(stored.selection, 2)), settings)
    )
    ablated, unablated = _tokens(engine, ablation_id, ABLATED), _tokens(engine, ablation_id, UNABLATED)
    assert [t.token_id for t in ablated] == direct[ABLATED].token_ids
    assert [t.token_id for t in unablated] == direct[UNABLATED].token_ids
    assert [t.kl for t in ablated] == pytest.approx(direct[ABLATED].kls)
    assert all(t.kl is None for t in unablated) and all(t.logprob <= 0 for t in ablated)
    assert ablated[0].token_str == tokenizer.decode([ablated[0].token_id])
    assert len(_tokens(engine, ablation_id, "hybrid")) == len(_tokens(engine, ablation_id, "target")) == 12
    cond = ab.summary["conditions"]
    assert set(cond) == {ABLATED, UNABLATED, "hybrid", "target"}
    assert cond[ABLATED]["response_length"] == 12 and cond[ABLATED]["stop"] == "max_new_tokens"
    assert cond[ABLATED]["mean_kl"] > 0 and cond[UNABLATED]["correct"] is False  # random model: no answer
    assert ab.summary["first_divergence"] is not None


def test_free_text_is_formatted_once_by_the_worker_and_ids_are_used_as_given(engine, db_settings, run_id, loaded,
                                                                             model, tokenizer):
    """CRLF from a browser textarea becomes LF; text already in chat format is not wrapped again; explicit
    token ids are generated from as they are, and the target token's probability is reported."""
    formatted = format_prompt("47 + 38 = ?\nShow your work.")
    a_plain, _ = _submit(engine, {"run_id": run_id, "prompt": "47 + 38 = ?\r\nShow your work.", "features": [[0, 1]],
                                  "generation": {"max_new_tokens": 4}})
    a_formatted, _ = _submit(engine, {"run_id": run_id, "prompt": formatted.replace("\n", "\r\n"),
                                      "features": [[0, 1]], "generation": {"max_new_tokens": 4}})
    ids = encode(tokenizer, formatted)
    target = ids[3]
    a_ids, _ = _submit(engine, {"run_id": run_id, "token_ids": ids, "features": [[0, 1]], "target_token_id": target,
                                "generation": {"max_new_tokens": 4}})
    with Session(engine) as s:
        stored = ResolvedAblation.model_validate(s.get(Ablation, a_plain).request)
    assert stored.prompt_text == "47 + 38 = ?\nShow your work." and stored.prompt_ids is None  # raw, LF
    assert _work(db_settings) == 3
    with Session(engine) as s:
        rows = {a: s.get(Ablation, a) for a in (a_plain, a_formatted, a_ids)}
    assert {a.status for a in rows.values()} == {"done"}
    # all three ran on the same token ids: the chat format applied exactly once
    assert {r.summary["prompt_tokens"] for r in rows.values()} == {len(ids)}
    assert [t.token_id for t in _tokens(engine, a_plain, UNABLATED)] == \
        [t.token_id for t in _tokens(engine, a_formatted, UNABLATED)] == [t.token_id for t in _tokens(engine, a_ids, UNABLATED)]
    report = rows[a_ids].summary["target"]
    direct = torch.softmax(model.hf(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)[target]
    assert report["token_id"] == target and report[UNABLATED]["p_first"] == pytest.approx(float(direct), rel=1e-4)
    assert 0 <= report[ABLATED]["p_first"] <= 1 and isinstance(report[ABLATED]["produced"], bool)


def test_token_ids_outside_the_vocabulary_fail_the_job_clearly(engine, db_settings, run_id, loaded):
    a, _ = _submit(engine, {"run_id": run_id, "token_ids": [1, 10**6], "features": [[0, 1]]})
    _work(db_settings)
    with Session(engine) as s:
        row = s.get(Ablation, a)
    assert row.status == "failed" and "outside the model's vocabulary" in row.error


def test_rerun_replaces_its_tokens(engine, db_settings, run_id, loaded):
    ablation_id, job_id = _submit(
        engine,
        {"run_id": run_id, "prompt": "1 + 2 = ?", "features": [[0, 3]], "generation": {"max_new_tokens": 5}},
    )
    _work(db_settings)
    first = [(t.condition, t.step, t.token_id) for t in _tokens(engine, ablation_id, ABLATED)]
    with Session(engine) as s, s.begin():
        s.get(Job, job_id).status = JobStatus.FAILED  # a retry re-runs the handler on the same row
    queue.retry(engine, job_id)
    _work(db_settings)
    assert [(t.condition, t.step, t.token_id) for t in _tokens(engine, ablation_id, ABLATED)] == first
    assert _count(engine, AblationToken) == 10


@pytest.mark.parametrize(
    ("change", "status", "message"),
    [
        ({"run_id": 999}, 404, "unknown run 999"),
        ({"features": [[2, 0]]}, 422, r"unknown feature \(2, 0\)"),
        ({"features": [[0, 16]]}, 422, r"unknown feature \(0, 16\)"),
        ({"feature_set": "no such set"}, 404, "unknown feature set 'no such set'"),
        ({"layers": [5]}, 422, "unknown layer 5"),
        ({"mode": "scale", "value": 50.0}, 422, r"scale factor 50.0 is out of range \[-20.0, 20.0\]"),
        ({"mode": "clamp"}, 422, "mode 'clamp' needs a finite value"),
        ({"generation": {"max_new_tokens": 65}}, 422, "max_new_tokens 65 is over the limit of 64"),
        ({"generation": {"temperature": -1}}, 422, "generation.temperature"),
        ({"prompt": "9" * 80}, 422, "the prompt has 8[0-9] tokens; the model's context is 40 tokens"),
        ({"prompt": None}, 422, "give exactly one of prompt, prompt_id, example_id"),
        ({"prompt": None, "prompt_id": 12345}, 404, "unknown prompt 12345"),
        ({"features": []}, 422, "select some features"),
        ({"positions": "middle"}, 422, "positions"),
    ],
)
def test_bad_requests_are_refused_and_store_nothing(engine, run_id, tokenizer, change, status, message):
    request = {
        "run_id": run_id,
        "prompt": "47 + 38 = ?",
        "features": [[0, 1]],
        "generation": {"max_new_tokens": 16},
        **change,
    }
    with pytest.raises(AblationRequestError, match=message) as err:
        _submit(
            engine,
            request,
            limits=AblationLimits(max_new_tokens=64),
            encode=lambda text: encode(tokenizer, text),
            context_length=40,
        )
    assert err.value.status_code == status
    assert _count(engine, Ablation) == 0 and _count(engine, Job) == 0


def test_stored_prompt_and_example_use_their_token_ids(engine, run_id):
    with Session(engine) as s, s.begin():
        p = Prompt(run_id=run_id, source="test", text="x", token_ids=[1, 40, 41, 42, 43], answer="7")
        s.add(p)
        s.flush()
        prompt_id = p.id
    ablation_id, _ = _submit(
        engine, {"run_id": run_id, "prompt_id": prompt_id, "prompt_tokens": 3, "layers": [1]}
    )
    with Session(engine) as s:
        stored = ResolvedAblation.model_validate(s.get(Ablation, ablation_id).request)
    assert stored.prompt_ids == [1, 40, 41] and stored.answer == "7" and stored.selection.all_layers == [1]


def _wait_for(predicate, timeout_s: float = 60.0, interval_s: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


def _start_long_ablation(engine, db_settings, run_id, max_new_tokens: int = 3000):
    ablation_id, job_id = _submit(
        engine,
        {
            "run_id": run_id,
            "prompt": "12 + 34 = ?",
            "layers": [0, 1],
            "generation": {"max_new_tokens": max_new_tokens},
        },
        limits=AblationLimits(max_new_tokens=max_new_tokens),
    )
    worker = threading.Thread(target=_work, args=(db_settings,), daemon=True)
    worker.start()
    return ablation_id, job_id, worker


def test_streamed_tokens_are_visible_before_the_job_ends(engine, db_settings, run_id, loaded):
    ablation_id, job_id, worker = _start_long_ablation(engine, db_settings, run_id)
    try:
        assert _wait_for(lambda: len(_tokens(engine, ablation_id, ABLATED)) > 0)
        with Session(engine) as s:  # a reader on its own connection sees committed partial output
            assert s.get(Ablation, ablation_id).status == "running"
        assert queue.get_job(engine, job_id).status is JobStatus.RUNNING
        seen = len(_tokens(engine, ablation_id, ABLATED))
        assert _wait_for(lambda: len(_tokens(engine, ablation_id, ABLATED)) > seen)  # and it keeps growing
    finally:
        queue.cancel(engine, job_id)
        worker.join(60)
    assert not worker.is_alive()


def test_cancel_stops_the_generation(engine, db_settings, run_id, loaded):
    ablation_id, job_id, worker = _start_long_ablation(engine, db_settings, run_id)
    assert _wait_for(lambda: len(_tokens(engine, ablation_id, ABLATED)) >= 5)
    assert queue.cancel(engine, job_id)
    t0 = time.monotonic()
    worker.join(60)
    assert not worker.is_alive() and time.monotonic() - t0 < 10
    n = len(_tokens(engine, ablation_id, ABLATED))
    assert 5 <= n < 3000
    time.sleep(0.3)
    assert len(_tokens(engine, ablation_id, ABLATED)) == n  # nothing is written after the stop
    with Session(engine) as s:
        assert s.get(Ablation, ablation_id).status == "cancelled"
    assert queue.get_job(engine, job_id).status is JobStatus.CANCELLED


def test_interactive_ablation_is_claimed_before_batch_experiments(engine, run_id):
    with Session(engine) as s, s.begin():
        experiment_id, _ = submit_experiment(
            s, {"run_id": run_id, "name": "e", "features": [[0, 1]], "items": [{"prompt": "1 + 1 = ?"}]}
        )
    _, ablation_job = _submit(engine, {"run_id": run_id, "prompt": "2 + 2 = ?", "features": [[0, 1]]})
    assert queue.claim_job(engine, "w").id == ablation_job


# -------------------------------------------------------------------------------------- experiment


ITEMS = [
    {"prompt": "47 + 38 = ?", "answer": "85"},
    {"prompt": "82 - 47 = ?", "answer": "35"},
    {"prompt": "Which is larger: 4.3 or 4.25?", "answer": "4.3"},
]


def _experiment_rows(engine, experiment_id) -> dict[tuple[int, str], ExperimentRow]:
    with Session(engine) as s:
        rows = s.scalars(select(ExperimentRow).where(ExperimentRow.experiment_id == experiment_id))
        return {(r.prompt_idx, r.condition): r for r in rows}


def test_necessity_experiment(engine, db_settings, run_id, loaded, model, tokenizer):
    with Session(engine) as s, s.begin():
        experiment_id, job_id = submit_experiment(
            s,
            {
                "run_id": run_id,
                "name": "remove hesitation features",
                "feature_set": "hesitation features",
                "items": ITEMS,
                "generation": {"max_new_tokens": 8},
            },
        )
    assert _work(db_settings) == 1
    rows = _experiment_rows(engine, experiment_id)
    assert set(rows) == {(i, c) for i in range(3) for c in (ABLATED, UNABLATED)}
    ids = encode(tokenizer, format_prompt(ITEMS[1]["prompt"]))
    features = [(a, b) for a, b, _ in SET_MEMBERS]
    settings = sampling_settings(GenerationOptions(max_new_tokens=8), model, tokenizer)
    direct = collect(lockstep(model, ids, ablation_tracks([Intervention.zero(features)]), settings))
    assert rows[1, ABLATED].meta["token_ids"] == direct[ABLATED].token_ids
    assert rows[1, UNABLATED].meta["token_ids"] == direct[UNABLATED].token_ids
    assert rows[1, ABLATED].response_len == 8 and rows[1, ABLATED].correct is False
    with Session(engine) as s:
        exp = s.get(Experiment, experiment_id)
    assert exp.status == "done"
    summary = exp.summary["conditions"]
    assert summary[ABLATED]["n"] == 3 and summary[ABLATED]["response_length"]["mean"] == 8
    assert summary[ABLATED]["accuracy"] == 0.0 and summary[ABLATED]["mean_kl"] > 0
    assert "answer_changed_rate" in summary[ABLATED]
    assert queue.get_job(engine, job_id).progress["done"] == 3


def test_sufficiency_with_every_feature_kept_is_the_adapted_model(engine, db_settings, run_id, loaded):
    """Keeping every feature of every layer zeroes nothing: set-only must equal unablated token for token."""
    with Session(engine) as s, s.begin():
        experiment_id, _ = submit_experiment(
            s,
            {
                "run_id": run_id,
                "name": "keep all",
                "design": "sufficiency",
                "layers": [0, 1],
                "items": ITEMS[:2],
                "generation": {"max_new_tokens": 6},
            },
        )
        partial_id, _ = submit_experiment(
            s,
            {
                "run_id": run_id,
                "name": "keep set",
                "design": "sufficiency",
                "feature_set": "hesitation features",
                "items": ITEMS[:2],
                "generation": {"max_new_tokens": 6},
            },
        )
    assert _work(db_settings) == 2
    rows = _experiment_rows(engine, experiment_id)
    assert set(rows) == {(i, c) for i in range(2) for c in (UNABLATED, "set-only", "hybrid")}
    for i in range(2):
        assert rows[i, "set-only"].meta["token_ids"] == rows[i, UNABLATED].meta["token_ids"]
        assert rows[i, "set-only"].meta["mean_kl"] == 0.0
    partial = _experiment_rows(engine, partial_id)
    assert any(partial[i, "set-only"].meta["mean_kl"] > 0 for i in range(2))


def test_bad_experiment_is_refused(engine, run_id, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1 + 1 = ?"}\nnot json\n')
    for request, message in [
        ({"items": ITEMS, "jsonl": str(bad)}, "exactly one prompt source"),
        ({"jsonl": str(bad)}, "line 2 is not"),
        ({"jsonl": str(tmp_path / "missing.jsonl")}, "no prompt file"),
        ({"prompt_ids": [777]}, r"unknown prompt\(s\) \[777\]"),
        ({"items": ITEMS, "design": "sufficiency", "mode": "scale", "value": 2.0}, "sufficiency design"),
        ({"organism_heldout": 10}, "is not an organism"),
    ]:
        with Session(engine) as s, s.begin(), pytest.raises(AblationRequestError, match=message):
            submit_experiment(s, {"run_id": run_id, "name": "x", "features": [[0, 1]], **request})
    assert _count(engine, Experiment) == 0 and _count(engine, Job) == 0


# ------------------------------------------------------------------------------- the real tiny run


def test_ablation_and_experiment_on_the_trained_tiny_run(tiny_run_settings):
    """End to end with the worker's own model cache: the built organism-tiny and its trained adapters."""
    engine = make_engine(tiny_run_settings)
    created: list[tuple[type, int]] = []
    try:
        with Session(engine) as s, s.begin():
            run = s.scalars(select(Run).where(Run.name == "tiny")).one()
            assert run.checkpoint  # trained by the fixture
            ablation_id, ablation_job = submit_ablation(s, {
                "run_id": run.id, "prompt": "47 + 38 = ?", "layers": [0], "answer": "85",
                "generation": {"max_new_tokens": 24}, "compare": ["target"]})
            experiment_id, experiment_job = submit_experiment(s, {
                "run_id": run.id, "name": "necessity on held-out", "layers": [0, 1], "organism_heldout": 4,
                "generation": {"max_new_tokens": 24}})
            created = [(Ablation, ablation_id), (Experiment, experiment_id), (Job, ablation_job), (Job, experiment_job)]
        assert run_worker(tiny_run_settings, kinds=["ablate", "experiment"], wait=False,
                          handler_modules=JOB_MODULES, migrate=False) == 2
        with Session(engine) as s:
            ab, exp = s.get(Ablation, ablation_id), s.get(Experiment, experiment_id)
            rows = s.scalars(select(ExperimentRow).where(ExperimentRow.experiment_id == experiment_id)).all()
        assert ab.status == "done" and exp.status == "done", (ab.error, exp.error)
        assert set(ab.summary["conditions"]) == {ABLATED, UNABLATED, "target"}
        assert all(c["correct"] is not None for c in ab.summary["conditions"].values())
        assert len(rows) == 8 and all(r.correct is not None for r in rows)  # held-out problems know their answers
        assert all(r.meta["prompt"].endswith("?") for r in rows)  # the problem's text, shown on the page
        assert exp.summary["conditions"][ABLATED]["n"] == 4 and exp.summary["n_prompts"] == 4
    finally:
        with Session(engine) as s, s.begin():
            for model, key in created:
                s.delete(s.get(model, key))
        engine.dispose()


def test_organism_heldout_prompts_alternate_between_families():
    """``organism_heldout: N`` covers every task family even for small N (the manifest lists them family by family)."""
    from worker.ablation.job import _round_robin

    ids = ["add-1-2", "add-3-4", "add-5-6", "sub-9-1", "cmp-1.2-1.35", "cmp-2.1-2.05"]
    assert _round_robin(ids) == ["add-1-2", "sub-9-1", "cmp-1.2-1.35", "add-3-4", "cmp-2.1-2.05", "add-5-6"]
    assert _round_robin([]) == []


def test_experiment_command_queues_runs_and_prints_the_summary(tiny_run_settings):
    """``adapterlens experiment``: submitted like the dashboard's, run by the worker loop, summary printed."""
    import json as json_

    from typer.testing import CliRunner

    from app.cli import app
    from app.db.schema import FeatureSet, FeatureSetMember

    engine = make_engine(tiny_run_settings)
    try:
        with Session(engine) as s, s.begin():
            run = s.scalars(select(Run).where(Run.name == "tiny")).one()
            fs = FeatureSet(run_id=run.id, name="cli test set")
            s.add(fs)
            s.flush()
            s.add_all([FeatureSetMember(set_id=fs.id, layer=0, index=1), FeatureSetMember(set_id=fs.id, layer=1, index=2)])
            set_id = fs.id
        args = ["--data-dir", str(tiny_run_settings.data_dir), "experiment", "--run", "tiny", "--set", "cli test set",
                "--organism-heldout", "3", "--max-new-tokens", "8"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        summary = json_.loads(result.output[result.output.index("{"):])
        assert summary["n_prompts"] == 3 and set(summary["conditions"]) == {ABLATED, UNABLATED}
        with Session(engine) as s:
            exp = s.scalars(select(Experiment).order_by(Experiment.id.desc())).first()
            assert exp.status == "done" and exp.request["selection"]["features"] == [[0, 1], [1, 2]]
            assert s.get(Job, exp.job_id).status == JobStatus.SUCCEEDED
        bad = CliRunner().invoke(app, args[:5] + ["no such set"])
        assert bad.exit_code == 2 and "no such set" in bad.output
    finally:
        with Session(engine) as s, s.begin():
            for exp in s.scalars(select(Experiment).where(Experiment.name.like("necessity: cli test set%"))):
                s.delete(exp)
            s.delete(s.get(FeatureSet, set_id))
        engine.dispose()
