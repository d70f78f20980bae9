"""The ``adapterlens`` command line: one command per job a person does.

Torch-side code is imported inside the commands that need it, so ``serve`` and ``db`` run in the
web image, which has no torch. Global options (``--data-dir``, ``--database-url``) are exported to
the environment, so the worker and server processes that ``up`` starts see the same settings.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from app.settings import Settings
from training.threads import prepare_process

app = typer.Typer(help="AdapterLens: what did reasoning training change inside this model?",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")

log = logging.getLogger("adapterlens")

DEFAULT_ORGANISM = "organism"
DEFAULT_TRAIN_PRESET = "organism"


@app.callback()
def main_options(
    data_dir: Annotated[Path | None, typer.Option(help="Data directory (env ADAPTERLENS_DATA_DIR; default ./data).")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy/Postgres URL (env DATABASE_URL; "
                                                          "default SQLite in the data directory).")] = None,
    device: Annotated[str | None, typer.Option(help="torch device: auto, cpu, cuda, cuda:1 …")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    if data_dir is not None:
        os.environ["ADAPTERLENS_DATA_DIR"] = str(data_dir.expanduser().resolve())
    if database_url is not None:
        os.environ["DATABASE_URL"] = database_url
    if device is not None:
        os.environ["ADAPTERLENS_DEVICE"] = device
    # Before any command imports torch: its OpenMP threads sleep when idle instead of spinning on cores that
    # other processes need (training/threads.py); inherited by every process this one starts.
    prepare_process()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _settings() -> Settings:
    return Settings()


_migrated: set[str] = set()  # database URLs this process has brought to the current schema


def _ready_db(settings: Settings | None = None) -> Settings:
    """Settings whose database is migrated: once per process and URL, under app.db.migrate's lock (two
    processes starting together on a new data directory migrate it once)."""
    from app.db.migrate import upgrade

    settings = settings or _settings()
    if settings.db_url not in _migrated:
        upgrade(settings.db_url)
        _migrated.add(settings.db_url)
    return settings


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg="red")
    return typer.Exit(2)


def _inline(kind: str, payload: dict):
    """Run a job kind's handler in the foreground (same code as the worker), after migrating the store."""
    from worker.loop import limit_threads, run_inline

    settings = _ready_db()
    limit_threads(settings.torch_threads)
    try:
        return run_inline(settings, kind, payload, handler_modules=["worker.pipeline", *_extra_handler_modules()])
    except (ValueError, LookupError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from exc


def _extra_handler_modules() -> list[str]:
    """Handler modules beyond the pipeline's, when present (they land issue by issue)."""
    import importlib.util

    names = ["worker.collect.job", "worker.hesitation.job", "worker.ablation.job", "worker.lens.job", "worker.importing",
             "worker.labels"]
    return [n for n in names if importlib.util.find_spec(n) is not None]


def _words(text: str | None) -> list[str] | None:
    """``--hesitation-words "Wait, Hmm"`` → a checked list (None: the default words)."""
    from training.hesitation import HesitationWordsError, normalize_words

    if text is None:
        return None
    try:
        return list(normalize_words(text))
    except HesitationWordsError as exc:
        raise _fail(str(exc)) from exc


def _pair_request(base: str, target: str, data: Path | None, *, name: str | None, preset: str, overrides: list[str],
                  prompts: Path | None = None, eval_data: Path | None = None, hesitation_words: str | None = None,
                  chat_format: str | None = None, **extra):
    """The request describing a user's pair (app.db.pipelines), with a clear error for a bad option."""
    from app.db.pipelines import PipelineRequestError, parse_request

    if data is None:
        raise _fail("training real models needs --data (a JSONL file with a 'text' field)")
    for flag, path in (("--data", data), ("--prompts", prompts), ("--eval-data", eval_data)):
        if path is not None and not path.is_file():
            raise _fail(f"{flag}: no file at {path}")
    fields = {"base": base, "target": target, "data": str(data), "name": name, "preset": preset, "overrides": overrides,
              "prompts": str(prompts) if prompts else None, "eval_data": str(eval_data) if eval_data else None,
              "hesitation_words": _words(hesitation_words), "chat_format": chat_format, **extra}
    try:
        return parse_request({k: v for k, v in fields.items() if v is not None})
    except PipelineRequestError as exc:
        raise _fail(str(exc)) from exc


def _create_run(name: str | None, base: str | None, target: str | None, preset: str, organism_preset: str,
                seed: int, config: Path | None, overrides: list[str], data: Path | None, **pair) -> int:
    """Create (or find) the run row that the train/evaluate/collect handlers work on (migrating a new store)."""
    from app.db.pipelines import PipelineRequestError, create_run
    from app.db.session import make_engine, make_sessionmaker
    from training.config import load_train_config, train_config_to_dict
    from worker.demo import ensure_run, organism_run_name, organism_spec

    if (base is None) != (target is None):
        raise _fail("give both --base and --target, or neither (the organism)")
    settings = _ready_db()
    engine = make_engine(settings)
    try:
        with make_sessionmaker(engine)() as s, s.begin():
            if base is not None:
                req = _pair_request(base, target, data, name=name, preset=preset, overrides=overrides, **pair)
                try:
                    return create_run(s, req, config_file=config)
                except PipelineRequestError as exc:
                    raise _fail(str(exc)) from exc
            try:
                cfg = load_train_config(config, preset_name=preset, overrides=overrides)
            except ValueError as exc:
                raise _fail(str(exc)) from exc
            spec = organism_spec(organism_preset, seed)
            config_dict = {"train": train_config_to_dict(cfg), "data": {"kind": "organism"}, "preset": preset}
            words = _words(pair.get("hesitation_words"))
            if words:
                config_dict["hesitation_words"] = words
            return ensure_run(s, name=name or organism_run_name(organism_preset, seed, preset), base_model=spec,
                              target_model=spec, config=config_dict)
    finally:
        engine.dispose()


def _run_id(run: str | None) -> int:
    """A run by name or id (default: the latest)."""
    from sqlalchemy import select

    from app.db.schema import Run
    from app.db.session import make_engine, make_sessionmaker

    settings = _ready_db()
    engine = make_engine(settings)
    try:
        with make_sessionmaker(engine)() as s:
            if run is None:
                found = s.scalar(select(Run).order_by(Run.id.desc()).limit(1))
            elif run.isdigit():
                found = s.get(Run, int(run))
            else:
                found = s.scalar(select(Run).where(Run.name == run))
            if found is None:
                raise _fail(f"no run {run!r}" if run else "no runs yet; train one with `adapterlens train`")
            return found.id
    finally:
        engine.dispose()


# -- commands ----------------------------------------------------------------------------------------------

@app.command()
def organism(
    preset: Annotated[str, typer.Option(help="organism or organism-tiny")] = DEFAULT_ORGANISM,
    seed: Annotated[int, typer.Option(help="Everything is deterministic from this seed.")] = 0,
    force: Annotated[bool, typer.Option(help="Rebuild even if cached.")] = False,
) -> None:
    """Build (or reuse) the model organism: a tiny base model and its hesitating reasoning variant."""
    out = _inline("organism", {"preset": preset, "seed": seed, "force": force})
    typer.echo(json.dumps(out, indent=1))


@app.command()
def train(
    run: Annotated[str | None, typer.Option(help="Run name (default from the models and preset).")] = None,
    base: Annotated[str | None, typer.Option(help="Base model (MLP donor): path or HF id. Default: the organism.")] = None,
    target: Annotated[str | None, typer.Option(help="Target (reasoning) model: path or HF id.")] = None,
    data: Annotated[Path | None, typer.Option(help="JSONL training texts (real models).")] = None,
    preset: Annotated[str, typer.Option(help="Training preset: organism, organism-tiny, paper-7b.")] = DEFAULT_TRAIN_PRESET,
    config: Annotated[Path | None, typer.Option(help="YAML training config (instead of --preset).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key, e.g. --set lr=1e-3.")] = None,
    organism_preset: Annotated[str, typer.Option(help="Organism preset when no models are given.")] = DEFAULT_ORGANISM,
    seed: Annotated[int, typer.Option(help="Organism seed.")] = 0,
    fresh: Annotated[bool, typer.Option(help="Start over instead of resuming the run's checkpoint.")] = False,
    nproc: Annotated[int | None, typer.Option(min=1, help="Data-parallel processes, one per GPU (torchrun); "
                                              "default ADAPTERLENS_TRAIN_NPROC or 1.")] = None,
    eval_data: Annotated[Path | None, typer.Option(help="JSONL of held-out texts (default: 10% of --data is held out "
                                                        "and never trained on).")] = None,
    prompts: Annotated[Path | None, typer.Option(help="JSONL {prompt, answer?}: the run's evaluation prompts.")] = None,
    hesitation_words: Annotated[str | None, typer.Option(help="The run's hesitation words, comma-separated "
                                                              "(default: Wait, wait, Hmm, Actually, But).")] = None,
    chat_format: Annotated[str | None, typer.Option(help="Prompt template with one {prompt} (default: the "
                                                         "tokenizer's chat template).")] = None,
) -> None:
    """Train transcoder adapters so that the adapter model matches the target."""
    if base is None:
        _inline("organism", {"preset": organism_preset, "seed": seed})
    run_id = _create_run(run, base, target, preset, organism_preset, seed, config, set_ or [], data,
                         prompts=prompts, eval_data=eval_data, hesitation_words=hesitation_words,
                         chat_format=chat_format)
    out = _inline("train", {"run_id": run_id, "resume": not fresh, "nproc": nproc})
    typer.echo(json.dumps({k: v for k, v in out.items() if k != "final"}, indent=1))


@app.command()
def evaluate(
    run: Annotated[str | None, typer.Option(help="Run name or id (default: the latest).")] = None,
    n_prompts: Annotated[int, typer.Option(help="Held-out prompts generated from.")] = 300,
    n_texts: Annotated[int, typer.Option(help="Held-out texts KL and NMSE are measured on.")] = 300,
    prompts: Annotated[Path | None, typer.Option(help="JSONL {prompt, answer?} (default: the run's prompts, else "
                                                      "the prompts of its held-out texts).")] = None,
    eval_data: Annotated[Path | None, typer.Option(help="JSONL of held-out texts (default: the run's held-out "
                                                        "split).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt.")] = 96,
) -> None:
    """Compare base / hybrid / adapted / target: KL, gap closed and NMSE on held-out texts; hesitation, length
    and accuracy on generations."""
    out = _inline("evaluate", {"run_id": _run_id(run), "n_prompts": n_prompts, "n_texts": n_texts,
                               "max_new_tokens": max_new_tokens, "prompts_path": str(prompts) if prompts else None,
                               "eval_path": str(eval_data) if eval_data else None})
    typer.echo(out["table"])


@app.command("collect")
def collect_cmd(
    run: Annotated[str | None, typer.Option(help="Run name or id (default: the latest).")] = None,
    n_prompts: Annotated[int, typer.Option(help="Organism: held-out prompts whose target responses form the corpus.")] = 600,
    corpus: Annotated[Path | None, typer.Option(help="JSONL with a 'text' field (default: the run's own texts; "
                                                     "the organism: the target's responses).")] = None,
    top_k: Annotated[int, typer.Option(help="Top-activating examples kept per feature.")] = 20,
) -> None:
    """Collect every feature's statistics and examples into the store."""
    out = _inline("collect", {"run_id": _run_id(run), "n_prompts": n_prompts, "top_k": top_k,
                              "corpus_path": str(corpus) if corpus else None})
    typer.echo(json.dumps({k: v for k, v in out.items() if k != "summary"}, indent=1))


@app.command()
def label(
    run: Annotated[str | None, typer.Option(help="Run name or id (default: the latest).")] = None,
    labeler: Annotated[str, typer.Option(help="builtin (rules over the stored evidence; no model) or llm (an "
                                              "OpenAI-compatible endpoint: --llm-url, --llm-model, key in "
                                              "ADAPTERLENS_LABEL_LLM_KEY).")] = "builtin",
    per_layer: Annotated[int | None, typer.Option(min=1, help="Label a sample of this many alive features per layer "
                                                        "(seed 42; the paper's classification: 250).")] = None,
    layers: Annotated[str | None, typer.Option(help="Only these layers, comma-separated.")] = None,
    alive_only: Annotated[bool, typer.Option(help="Leave out features that never fired.")] = False,
    fresh: Annotated[bool, typer.Option(help="LLM: relabel features this model already labelled.")] = False,
    llm_url: Annotated[str | None, typer.Option(help="Chat endpoint base URL, e.g. http://localhost:8000/v1 "
                                                     "(env ADAPTERLENS_LABEL_LLM_URL).")] = None,
    llm_model: Annotated[str | None, typer.Option(help="Model name (env ADAPTERLENS_LABEL_LLM_MODEL).")] = None,
) -> None:
    """Label and categorise features (the paper's categories): built-in rules, or an LLM judge with detection
    scoring."""
    if labeler not in ("builtin", "llm"):
        raise _fail(f"--labeler must be builtin or llm, not {labeler!r}")
    if llm_url is not None:
        os.environ["ADAPTERLENS_LABEL_LLM_URL"] = llm_url
    if llm_model is not None:
        os.environ["ADAPTERLENS_LABEL_LLM_MODEL"] = llm_model
    try:
        layer_list = [int(x) for x in layers.split(",") if x.strip()] if layers else None
    except ValueError:
        raise _fail(f"--layers must be integers separated by commas, not {layers!r}") from None
    payload = {"run_id": _run_id(run), "labeler": labeler, "per_layer": per_layer, "layers": layer_list,
               "alive_only": alive_only, "resume": not fresh}
    out = _inline("label", {k: v for k, v in payload.items() if v is not None})
    typer.echo(json.dumps(out, indent=1, default=str))


@app.command()
def attribute(
    prompt: Annotated[str, typer.Argument(help="Text to explain (its last position's next token).")],
    run: Annotated[str | None, typer.Option(help="Run name or id (default: the latest).")] = None,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the chat format (user turn, <think>).")] = False,
    target_token: Annotated[str | None, typer.Option(help="A token that must be a logit node, e.g. Wait.")] = None,
    contrast_token: Annotated[str | None, typer.Option(help="Explain target − this token (a logit difference); "
                                                            "'auto': the best non-hesitation token.")] = None,
    mode: Annotated[str, typer.Option(help="relp (the paper) or frozen-mlp (circuit-tracer's semantics: "
                                           "error nodes for the frozen base MLP).")] = "relp",
    max_feature_nodes: Annotated[int, typer.Option(help="Feature node cap, chosen by influence.")] = 10_000,
    node_threshold: Annotated[float, typer.Option(help="Pruning: keep the nodes holding this share of the "
                                                       "influence on the logits (circuit-tracer's default).")] = 0.8,
    edge_threshold: Annotated[float, typer.Option(help="Pruning: keep the edges holding this share of the edge "
                                                       "influence.")] = 0.98,
    slug: Annotated[str | None, typer.Option(help="Graph id in the run (default: from the content).")] = None,
) -> None:
    """Build, prune and store one attribution graph on a run's adapter model."""
    payload = {"run_id": _run_id(run), "prompt": prompt, "chat": chat, "target_token": target_token,
               "contrast_token": contrast_token, "mode": mode, "max_feature_nodes": max_feature_nodes,
               "node_threshold": node_threshold, "edge_threshold": edge_threshold, "slug": slug}
    out = _inline("attribute", {k: v for k, v in payload.items() if v is not None})
    typer.echo(json.dumps(out, indent=1, default=str))
    if out.get("message"):
        typer.secho(out["message"], err=True, fg="yellow")


@app.command("import-graph")
def import_graph_cmd(
    path: Annotated[Path, typer.Argument(help="A graph JSON file written by circuit-tracer, Neuronpedia or "
                                              "AdapterLens (either error-node id form).")],
    run: Annotated[str | None, typer.Option(help="Run name or id to file it under (default: the latest).")] = None,
    new_run: Annotated[str | None, typer.Option(help="File it under a run of this name, created if missing "
                                                     "(for graphs of models AdapterLens did not train).")] = None,
    slug: Annotated[str | None, typer.Option(help="Graph id in the run (default: the file's slug).")] = None,
) -> None:
    """Import a circuit-tracer graph file into the store; its page opens in the graph viewer."""
    from app.db.migrate import upgrade
    from app.db.session import make_engine, make_sessionmaker
    from app.graph_import import GraphImportError, ensure_import_run, import_graph_file

    if new_run is None:
        run_id = _run_id(run)
    else:
        upgrade(_settings().db_url)
    engine = make_engine(_settings())
    try:
        with make_sessionmaker(engine)() as s:
            try:
                if new_run is not None:
                    run_id = ensure_import_run(s, new_run, f"imported:{path.name}")
                graph_id, n_nodes, n_links = import_graph_file(s, run_id, path, slug=slug)
            except GraphImportError as exc:
                raise _fail(str(exc)) from exc
            s.commit()
    finally:
        engine.dispose()
    typer.echo(json.dumps({"graph_id": graph_id, "run_id": run_id, "n_nodes": n_nodes, "n_links": n_links,
                           "page": f"/runs/{run_id}/graphs/{graph_id}"}))


@app.command()
def hesitation(
    run: Annotated[str | None, typer.Option(help="Run name or id (default: the latest).")] = None,
    n_graphs: Annotated[int, typer.Option(help="Graphs at sampled hesitation sites.")] = 24,
    mode: Annotated[str, typer.Option(help="relp or frozen-mlp.")] = "relp",
    hesitation_words: Annotated[str | None, typer.Option(help="Words, comma-separated (default: the run's).")] = None,
    traces: Annotated[str, typer.Option(help="Sites in: generated (the target's), adapted, reference (organism) or "
                                             "texts (the run's own).")] = "generated",
    prompts: Annotated[Path | None, typer.Option(help="JSONL {prompt, answer?} (default: the run's).")] = None,
) -> None:
    """The hesitation study: graphs at hesitation tokens, the features behind them, a named feature set."""
    payload = {"run_id": _run_id(run), "n_graphs": n_graphs, "mode": mode, "traces": traces,
               "hesitation_words": _words(hesitation_words), "prompts_path": str(prompts) if prompts else None}
    out = _inline("hesitation", {k: v for k, v in payload.items() if v is not None})
    typer.echo(json.dumps(out, indent=1, default=str))


def _run_request_now(kind: str, submit: Callable, request: dict, row_class: type) -> tuple[int, dict]:
    """Queue a dashboard-style request (``submit`` stores its row and job), drain it with the worker loop in
    this process, and return the row's id and summary: the same path as a click, run in the foreground."""
    from app.db.requests import AblationRequestError
    from app.db.session import make_engine, make_sessionmaker
    from worker.loop import run_worker

    settings = _settings()
    engine = make_engine(settings)
    try:
        with make_sessionmaker(engine)() as s:
            try:
                row_id, job_id = submit(s, request)
            except AblationRequestError as exc:
                raise _fail(str(exc)) from exc
            s.commit()
        typer.echo(f"{kind} {row_id} queued as job {job_id}; running it now")
        run_worker(settings, kinds=[kind], wait=False, migrate=False,
                   handler_modules=["worker.pipeline", *_extra_handler_modules()])
        with make_sessionmaker(engine)() as s:
            row = s.get(row_class, row_id)
            if row.status != "done":
                raise _fail(f"{kind} {row_id} ended {row.status}: {row.error}")
            return row_id, row.summary
    finally:
        engine.dispose()


@app.command()
def experiment(
    run: Annotated[str | None, typer.Option(help="Run name or id (default: the latest).")] = None,
    feature_set: Annotated[str, typer.Option("--set", help="Stored feature set to intervene on.")] = "hesitation features",
    design: Annotated[str, typer.Option(help="necessity (remove the set from the adapted model) or sufficiency "
                                             "(keep only the set on top of the hybrid).")] = "necessity",
    organism_heldout: Annotated[int | None, typer.Option(help="N held-out organism problems, taken in turn from each "
                                                              "family (0 = all; 200 when no --jsonl).")] = None,
    jsonl: Annotated[str | None, typer.Option(help="JSONL of {prompt, answer} instead (real models).")] = None,
    mode: Annotated[str, typer.Option(help="zero, scale (by --value; > 1 steers) or clamp (to --value).")] = "zero",
    value: Annotated[float | None, typer.Option(help="Scale factor or clamp value.")] = None,
    positions: Annotated[str, typer.Option(help="all, prompt or generated.")] = "all",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per response.")] = 96,
    name: Annotated[str | None, typer.Option(help="Experiment name shown on its page.")] = None,
) -> None:
    """An ablation experiment over a prompt set, queued and run now: the same job a dashboard user starts."""
    from app.db.requests import submit_experiment
    from app.db.schema import Experiment

    run_id = _run_id(run)
    if organism_heldout is None and jsonl is None:
        organism_heldout = 200
    label = design if mode == "zero" else f"{design}, {mode} {value}"
    request = {"run_id": run_id, "name": name or f"{label}: {feature_set}", "design": design,
               "feature_set": feature_set, "organism_heldout": organism_heldout, "jsonl": jsonl,
               "mode": mode, "value": value, "positions": positions, "generation": {"max_new_tokens": max_new_tokens}}
    experiment_id, summary = _run_request_now("experiment", submit_experiment,
                                                  {k: v for k, v in request.items() if v is not None}, Experiment)
    typer.echo(json.dumps(summary, indent=1, default=str))


@app.command()
def lens(
    text: Annotated[str | None, typer.Argument(help="The text (put in the run's chat format unless --raw).")] = None,
    run: Annotated[str | None, typer.Option(help="Run name or id (default: the latest).")] = None,
    token_ids: Annotated[str | None, typer.Option(help="Token ids instead of text, space-separated.")] = None,
    raw: Annotated[bool, typer.Option(help="Use the text as it is (no chat format).")] = False,
    feature: Annotated[list[str] | None, typer.Option(help="Watch a feature (layer:index), repeatable.")] = None,
) -> None:
    """The diff lens of a text: target, hybrid and adapted on the same ids (the job the Lens page queues)."""
    from app.db.lens_request import submit_lens
    from app.db.schema import LensResult
    from app.web.data.ablations import parse_features
    from app.web.data.common import BadInput

    run_id = _run_id(run)
    try:
        features = parse_features(" ".join(feature or []), required=False)
    except BadInput as exc:
        raise _fail(str(exc)) from exc
    request: dict = {"run_id": run_id, "chat": not raw, "features": [list(f) for f in features]}
    if token_ids is not None:
        try:
            request["token_ids"] = [int(t) for t in token_ids.replace(",", " ").split()]
        except ValueError:
            raise _fail("--token-ids takes whole numbers separated by spaces") from None
    else:
        request["prompt"] = text
    lens_id, summary = _run_request_now("lens", submit_lens, request, LensResult)
    typer.echo(json.dumps(summary, indent=1, default=str))
    typer.echo(f"lens {lens_id}: /runs/{run_id}/lens/{lens_id} on the dashboard (adapterlens serve)")


@app.command()
def pipeline(
    base: Annotated[str | None, typer.Option(help="Base model (MLP donor): directory or HF id. Default: the organism.")] = None,
    target: Annotated[str | None, typer.Option(help="Target (reasoning) model: directory or HF id.")] = None,
    data: Annotated[Path | None, typer.Option(help="JSONL {text}: the target's chat-formatted traces (your pair).")] = None,
    prompts: Annotated[Path | None, typer.Option(help="JSONL {prompt, answer?}: evaluation and study prompts "
                                                      "(default: the prompts of the texts).")] = None,
    eval_data: Annotated[Path | None, typer.Option(help="JSONL of held-out texts (default: 10% of --data).")] = None,
    hesitation_words: Annotated[str | None, typer.Option(help="The run's hesitation words, comma-separated.")] = None,
    chat_format: Annotated[str | None, typer.Option(help="Prompt template with one {prompt} (default: the "
                                                         "tokenizer's chat template).")] = None,
    run: Annotated[str | None, typer.Option(help="Run name (default from the target and preset).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML training config on top of the preset.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a training config key, e.g. --set lr=1e-3.")] = None,
    organism_preset: Annotated[str, typer.Option(help="organism or organism-tiny (no --base)")] = DEFAULT_ORGANISM,
    preset: Annotated[str, typer.Option(help="Training preset.")] = DEFAULT_TRAIN_PRESET,
    seed: Annotated[int, typer.Option(help="Organism seed.")] = 0,
    n_prompts: Annotated[int, typer.Option(help="Held-out prompts for the evaluation.")] = 300,
    n_graphs: Annotated[int, typer.Option(help="Graphs of the hesitation study.")] = 24,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt (evaluation, study).")] = 96,
    queue_it: Annotated[bool, typer.Option("--queue", help="Queue the steps for a worker instead (your pair).")] = False,
) -> None:
    """The whole study in the foreground: train → collect → evaluate → hesitation study.

    Without --base/--target: the embedded organism (built first). With them: your pair, trained on --data.
    """
    if base is None and target is None:
        if data is not None or queue_it:
            raise _fail("--data and --queue are for your own pair: give --base and --target too")
        _inline("organism", {"preset": organism_preset, "seed": seed})
        run_id = _create_run(run, None, None, preset, organism_preset, seed, config, set_ or [], None,
                             hesitation_words=hesitation_words)
        steps = {"train": {"run_id": run_id}, "collect": {"run_id": run_id},
                 "evaluate": {"run_id": run_id, "n_prompts": n_prompts}, "hesitation": {"run_id": run_id, "n_graphs": n_graphs}}
    else:
        from app.db.pipelines import step_payloads

        if base is None or target is None:
            raise _fail("give both --base and --target, or neither (the organism)")
        pair = {"prompts": prompts, "eval_data": eval_data, "hesitation_words": hesitation_words,
                "chat_format": chat_format, "n_prompts": n_prompts, "n_graphs": n_graphs,
                "max_new_tokens": max_new_tokens}
        req = _pair_request(base, target, data, name=run, preset=preset, overrides=set_ or [], **pair)
        if queue_it:
            _queue_pipeline(req, config)
            return
        run_id = _create_run(run, base, target, preset, organism_preset, seed, config, set_ or [], data, **pair)
        steps = step_payloads(req, run_id)
    for kind, payload in steps.items():
        typer.secho(f"== {kind} ==", bold=True, err=True)
        out = _inline(kind, payload)
        if kind == "evaluate":
            typer.echo(out["table"])
        elif kind != "train":
            typer.echo(json.dumps({kind: {k: v for k, v in out.items() if k not in ("summary", "features", "rules")}},
                                  indent=1, default=str))
    typer.echo(f"run {run_id} done: adapterlens serve, then http://127.0.0.1:8000/runs/{run_id}")


def _queue_pipeline(req, config: Path | None) -> None:
    """Create the run and queue its four steps (a worker runs them): the API's POST /api/pipelines, locally."""
    from app.db import queue
    from app.db.pipelines import PIPELINE_PRIORITY, PipelineRequestError, create_run, step_payloads
    from app.db.session import make_engine, make_sessionmaker

    engine = make_engine(_ready_db())
    try:
        with make_sessionmaker(engine)() as s, s.begin():
            try:
                run_id = create_run(s, req, config_file=config)
            except PipelineRequestError as exc:
                raise _fail(str(exc)) from exc
            jobs, previous = {}, None
            for kind, payload in step_payloads(req, run_id).items():
                previous = jobs[kind] = queue.enqueue(s, kind, payload, priority=PIPELINE_PRIORITY,
                                                      depends_on=previous, run_id=run_id)
    finally:
        engine.dispose()
    typer.echo(f"run {run_id}: queued {', '.join(f'{k} #{v}' for k, v in jobs.items())}; watch /jobs")


@app.command()
def worker(
    kinds: Annotated[str | None, typer.Option(help="Comma-separated job kinds to take (default: all).")] = None,
    exclude_kinds: Annotated[str | None, typer.Option(help="Comma-separated job kinds to leave to other workers "
                                                           "(`up`'s long-job worker leaves ablate,attribute,lens).")] = None,
    once: Annotated[bool, typer.Option(help="Exit when the queue is empty.")] = False,
    worker_id: Annotated[str | None, typer.Option(help="Worker id (default: host-pid-random).")] = None,
    restarts: Annotated[int, typer.Option(hidden=True, help="Set by `up`: restarts so far.")] = 0,
    note: Annotated[str | None, typer.Option(hidden=True, help="Set by `up`: why it was restarted.")] = None,
    parent_pid: Annotated[int | None, typer.Option(hidden=True, help="Set by `up`: stop when it is gone.")] = None,
    migrate: Annotated[bool, typer.Option(help="Apply migrations first (`up` has done it already).")] = True,
) -> None:
    """Run the job loop: claim jobs from the database and run them (a database outage never stops it)."""
    from worker.loop import limit_threads, run_worker

    settings = _settings()
    limit_threads(settings.torch_threads)  # the setting, else every available core (training/threads.py)
    split = lambda text: [k.strip() for k in text.split(",") if k.strip()] if text else None  # noqa: E731
    n = run_worker(settings, kinds=split(kinds), exclude_kinds=split(exclude_kinds), wait=not once,
                   worker_id=worker_id, restarts=restarts, note=note, parent_pid=parent_pid, migrate=migrate)
    typer.echo(f"processed {n} job(s)")


@app.command()
def enqueue(
    kind: Annotated[str, typer.Argument(help="Job kind: organism, train, evaluate, collect, …")],
    payload: Annotated[str, typer.Option(help="JSON payload.")] = "{}",
    priority: Annotated[int, typer.Option(help="Higher runs first.")] = 0,
) -> None:
    """Add a job to the queue (a running worker picks it up)."""
    from app.db import queue
    from app.db.migrate import upgrade
    from app.db.session import make_engine

    try:
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise _fail(f"--payload is not valid JSON: {exc}") from exc
    settings = _settings()
    upgrade(settings.db_url)
    engine = make_engine(settings)
    try:
        job_id = queue.enqueue(engine, kind, data, priority=priority)
    finally:
        engine.dispose()
    typer.echo(f"queued job {job_id} ({kind})")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = True,
    workers: Annotated[int, typer.Option(min=1, envvar="ADAPTERLENS_WEB_WORKERS",
                                         help="Server processes: each serves about one core's worth of pages.")] = 1,
) -> None:
    """Run the dashboard (no worker): pages and the JSON API."""
    from app.db.migrate import upgrade
    from app.web.main import serve as run_server

    settings = _settings()
    upgrade(settings.db_url)
    run_server(None if workers > 1 else settings, host=host, port=port, access_log=access_log, workers=workers)


class _Shutdown(BaseException):  # noqa: N818 (a control-flow signal like KeyboardInterrupt)
    """SIGTERM/SIGINT in ``up``: unwind to the code that stops the workers."""


@app.command()
def up(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    workers: Annotated[int, typer.Option(min=0, help="Workers for long jobs (train, collect, experiment, …).")] = 1,
    interactive_workers: Annotated[int, typer.Option(min=0, help="Workers reserved for the kinds a person waits "
                                                                 "for (ablate, attribute, lens).")] = 1,
    demo: Annotated[bool, typer.Option(help="Queue the demo pipeline when the store has no run.")] = True,
    access_log: Annotated[bool, typer.Option(help="Show every request in the terminal.")] = False,
    progress: Annotated[bool, typer.Option(help="A line at the bottom showing the running jobs "
                                                "(only on a terminal).")] = True,
    organism_preset: Annotated[str, typer.Option(help="Organism preset of the demo pipeline.")] = DEFAULT_ORGANISM,
    preset: Annotated[str, typer.Option(help="Training preset of the demo pipeline.")] = DEFAULT_TRAIN_PRESET,
    seed: Annotated[int, typer.Option(help="Organism seed.")] = 0,
) -> None:
    """The embedded default: migrate, start the workers and the dashboard; queue the demo pipeline on an empty store.

    The demo pipeline (organism → train → collect → evaluate → hesitation study) is queued only when
    the database has no run; a second ``up`` reuses everything. One worker takes long jobs and one the
    interactive ones, each restarted when it dies (app/supervisor.py); SIGTERM or Ctrl-C stops them all.
    """
    import signal
    import sys

    from app.db.migrate import upgrade
    from app.db.session import make_engine
    from app.supervisor import Supervisor, worker_classes
    from app.web.main import serve as run_server
    from worker.bootstrap import bootstrap as queue_demo_if_empty

    def shutdown(signum: int, _frame: object) -> None:
        raise _Shutdown(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, shutdown) for sig in (signal.SIGINT, signal.SIGTERM)}
    settings = _settings()
    upgrade(settings.db_url)
    engine = make_engine(settings)
    live = None
    line = None
    supervisor = None
    try:
        if demo:
            jobs = queue_demo_if_empty(engine, organism_preset=organism_preset, train_preset=preset, seed=seed)
            if jobs:
                typer.echo(f"empty store: queued the demo pipeline ({', '.join(jobs)}); watch it at /jobs")
        specs = worker_classes(interactive_workers, workers, threads=settings.torch_threads)
        typer.echo(f"dashboard: http://{host}:{port}/  (data: {settings.resolved_data_dir}, database: "
                   f"{settings.db_url.split('@')[-1]}; workers: "
                   + ", ".join(f"{s.name} ({s.threads} torch thread{'s' if s.threads != 1 else ''})" for s in specs)
                   + ")", err=True)
        if progress and sys.stderr.isatty():
            live, line = _progress_display(engine)  # before the workers: their output goes through it
        supervisor = Supervisor(specs, settings, worker_args=["--no-migrate"])
        supervisor.start()
        # uvicorn restores our handlers when it stops and re-raises the signal it caught: it lands in shutdown().
        run_server(settings, host=host, port=port, access_log=access_log)
    except _Shutdown as exc:
        log.info("%s: stopping the workers", exc)
    finally:
        def hurry(_signum: int, _frame: object) -> None:  # a second Ctrl-C: workers release their jobs now
            if supervisor is not None:
                supervisor.hurry()

        for sig in previous:
            signal.signal(sig, hurry)
        if line is not None:
            line.stop()
        if supervisor is not None:
            supervisor.stop()
        if live is not None:
            live.stop()
        engine.dispose()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _progress_display(engine):
    """A rich ``Live`` line at the bottom of the terminal; log lines (ours and the workers') print above it."""
    import sys

    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    from app.progress_line import ProgressLine

    live = Live(Text("▷ starting"), console=Console(stderr=True), refresh_per_second=2, transient=True,
                redirect_stdout=True, redirect_stderr=True)
    live.start()
    for handler in logging.getLogger().handlers:  # basicConfig's handler holds the real stderr: use the proxy
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)
    line = ProgressLine(engine, live)
    line.start()
    return live, line


# -- deployment: bootstrap, import, plan (docs/deploy.md) -----------------------------------------------------

@app.command()
def bootstrap(
    demo: Annotated[bool, typer.Option(envvar="ADAPTERLENS_DEMO", help="Queue the demo pipeline on an empty store.")] = True,
    organism_preset: Annotated[str, typer.Option(envvar="ADAPTERLENS_DEMO_ORGANISM", help="Organism preset of the demo.")] = DEFAULT_ORGANISM,
    preset: Annotated[str, typer.Option(envvar="ADAPTERLENS_DEMO_PRESET", help="Training preset of the demo.")] = DEFAULT_TRAIN_PRESET,
    seed: Annotated[int, typer.Option(envvar="ADAPTERLENS_DEMO_SEED", help="Organism seed.")] = 0,
) -> None:
    """First start (compose's migrate service): migrate, then queue the demo pipeline if the store has no run.

    Torch-free and safe to run concurrently: a lock makes the check and the enqueue one step.
    """
    from app.db.migrate import upgrade
    from app.db.session import make_engine
    from worker.bootstrap import bootstrap as run_bootstrap

    settings = _settings()
    upgrade(settings.db_url)
    engine = make_engine(settings)
    try:
        jobs = run_bootstrap(engine, demo=demo, organism_preset=organism_preset, train_preset=preset, seed=seed)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    finally:
        engine.dispose()
    if jobs:
        typer.echo(f"empty store: queued the demo pipeline ({', '.join(f'{k} #{v}' for k, v in jobs.items())})")
    else:
        typer.echo("nothing to queue" + ("" if demo else " (demo disabled)"))


@app.command("import-adapters")
def import_adapters(
    path: Annotated[str, typer.Argument(help="Checkpoint directory (paper/reference or AdapterLens format) or HF repo id.")],
    base: Annotated[str | None, typer.Option(help="Base model spec (MLP donor), e.g. Qwen/Qwen2.5-Math-7B.")] = None,
    target: Annotated[str | None, typer.Option(help="Target model spec, e.g. deepseek-ai/DeepSeek-R1-Distill-Qwen-7B.")] = None,
    name: Annotated[str | None, typer.Option(help="Run name (default: the checkpoint's folder name).")] = None,
    verify: Annotated[str, typer.Option(help="full (load it once) or tensors (names and shapes only).")] = "full",
    queue_it: Annotated[bool, typer.Option("--queue", help="Queue an import job for a worker instead.")] = False,
) -> None:
    """Register adapters trained elsewhere (e.g. the paper's released checkpoints) as a trained run."""
    payload = {"path": path, "base_model": base, "target_model": target, "name": name, "verify": verify}
    if queue_it:
        from app.db import queue
        from app.db.migrate import upgrade
        from app.db.session import make_engine

        settings = _settings()
        upgrade(settings.db_url)
        engine = make_engine(settings)
        try:
            job_id = queue.enqueue(engine, "import", payload)
        finally:
            engine.dispose()
        typer.echo(f"queued job {job_id} (import)")
        return
    from app.db.migrate import upgrade
    from worker.loop import run_inline

    settings = _settings()
    upgrade(settings.db_url)
    try:
        out = run_inline(settings, "import", payload, handler_modules=["worker.importing"])
    except (ValueError, LookupError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from exc
    typer.echo(json.dumps(out, indent=1))


@app.command()
def plan(
    target: Annotated[str, typer.Option(help="Target: named shape (qwen2.5-7b …), config.json, model dir or cached HF id.")] = "deepseek-r1-distill-qwen-7b",
    base: Annotated[str | None, typer.Option(help="Base (MLP donor); default: same shape as the target.")] = None,
    width: Annotated[int, typer.Option(help="Adapter features per layer.")] = 8192,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 10240,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 1,
    kl_chunk: Annotated[int, typer.Option(help="Rows per chunk of the fused head + KL.")] = 1024,
    weight_dtype: Annotated[str, typer.Option(help="Frozen weights: bf16 or fp32.")] = "bf16",
    precision: Annotated[str, typer.Option(help="Compute: bf16 (autocast) or fp32.")] = "bf16",
    gpu_gb: Annotated[float | None, typer.Option(help="Also say whether it fits, and the longest sequence that does.")] = None,
    recompute: Annotated[bool, typer.Option(help="Activation checkpointing (TrainConfig.activation_checkpointing; on in the paper-7b preset).")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Print the training memory plan of a pair: weights, adapters, optimizer, activations, KL buffers."""
    from training.memory_plan import max_seq_len_for, plan_memory

    kw = {"n_features": width, "kl_chunk": kl_chunk, "weight_dtype": weight_dtype, "precision": precision,
          "recompute": recompute}
    try:
        result = plan_memory(base or target, target, seq_len=seq_len, batch_size=batch_size, **kw)
        longest = max_seq_len_for(gpu_gb, base or target, target, **kw) if gpu_gb else None
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    if as_json:
        out = result.to_dict()
        if gpu_gb:
            out |= {"gpu_gb": gpu_gb, "fits": result.fits(gpu_gb), "max_seq_len": longest}
        typer.echo(json.dumps(out, indent=1))
        return
    typer.echo(result.format())
    if gpu_gb:
        verdict = "fits" if result.fits(gpu_gb) else "does NOT fit"
        typer.echo(f"\non a {gpu_gb:g} GB device: {verdict}; the longest batch-1 sequence that fits: {longest} tokens")


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply migrations (idempotent)."""
    from app.db.migrate import upgrade

    upgrade(_settings().db_url, revision)
    typer.echo(f"database at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument()] = "base") -> None:
    """Revert migrations (default: everything)."""
    from app.db.migrate import downgrade

    downgrade(_settings().db_url, revision)
    typer.echo(f"database at {revision}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
