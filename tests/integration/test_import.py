"""The ``import`` job / ``adapterlens import-adapters``: a released-format checkpoint becomes a trained run.

Checkpoints are written by our own savers from a tiny random pair (the paper's 7B files are ~30 GB):
the reference format (sharded, as ``save_pretrained`` writes the release) and ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sqlalchemy import select
from typer.testing import CliRunner

from app.db.schema import Run
from app.db.session import make_engine, make_sessionmaker
from app.settings import Settings
from tests.helpers import randomize_adapters, tiny_pair
from training.adapter import build_adapter_model
from training.checkpoint import save_adapters, save_reference_checkpoint
from training.config import AdapterConfig
from worker.importing import l1_from_name
from worker.loop import run_inline
from worker.models_cache import load_run_model


def _save_pair(tmp: Path):
    """A random tiny pair saved as model directories, and a trained-looking adapter model on it."""
    base_hf, target_hf = tiny_pair(3)
    base_hf.save_pretrained(tmp / "base")
    target_hf.save_pretrained(tmp / "target")
    model = randomize_adapters(build_adapter_model(base_hf, target_hf, AdapterConfig(n_features=16)), seed=3)
    return model, str(tmp / "base"), str(tmp / "target")


@pytest.fixture
def settings(sqlite_db_url: str, tmp_path: Path) -> Settings:
    """SQLite is enough where the database is not the point (the first test runs on both backends)."""
    return Settings(data_dir=tmp_path / "data", database_url=sqlite_db_url)


def _import(settings: Settings, **payload):
    return run_inline(settings, "import", payload, show_progress=False, handler_modules=["worker.importing"])


def _run(settings: Settings, name: str) -> Run:
    engine = make_engine(settings)
    try:
        with make_sessionmaker(engine)() as s:
            run = s.scalar(select(Run).where(Run.name == name))
            s.expunge_all()
            return run
    finally:
        engine.dispose()


def _same_adapters(a, b) -> bool:
    return all(torch.equal(x.W_enc, y.W_enc) and torch.equal(x.W_dec, y.W_dec) and torch.equal(x.b_dec, y.b_dec)
               for x, y in zip(a.adapters, b.adapters, strict=True))


def test_reference_checkpoint_imports_as_a_trained_run_that_loads(db_settings: Settings, tmp_path: Path) -> None:
    model, base, target = _save_pair(tmp_path)
    ckpt = save_reference_checkpoint(model, tmp_path / "transcoder-adapters-tiny-l1w0.001-l0-1.4", max_shard_size="20KB")
    assert (ckpt / "model.safetensors.index.json").is_file()  # sharded like the release

    out = _import(db_settings, path=str(ckpt), base_model=base, target_model=target)
    assert out["format"] == "reference" and out["target_checked"] is True
    run = _run(db_settings, "transcoder-adapters-tiny-l1w0.001-l0-1.4")
    assert run.status == "trained" and run.checkpoint == str(ckpt.resolve())
    assert (run.n_layers, run.n_features, run.d_model) == (model.n_layers, 16, 32)
    assert run.config["imported"]["l1"] == 0.001 and run.config["adapter"]["n_features"] == 16

    # what collect / attribute do with a run: assemble it from the specs and the checkpoint
    loaded, _ = load_run_model(db_settings, run.base_model, run.target_model, run.checkpoint, device="cpu")
    assert _same_adapters(loaded, model)

    again = _import(db_settings, path=str(ckpt), base_model=base, target_model=target, verify="tensors")
    assert again["run_id"] == out["run_id"]  # idempotent: the same run, updated


def test_our_format_takes_models_from_the_checkpoint(settings: Settings, tmp_path: Path) -> None:
    model, base, target = _save_pair(tmp_path)
    ckpt = save_adapters(model, tmp_path / "ours", base_name=base, target_name=target)
    out = _import(settings, path=str(ckpt), name="ours")
    assert (out["base_model"], out["target_model"], out["format"]) == (base, target, "adapterlens-adapters")
    assert _run(settings, "ours").status == "trained"


def test_reference_without_models_is_a_clear_error(settings: Settings, tmp_path: Path) -> None:
    model, _, _ = _save_pair(tmp_path)
    ckpt = save_reference_checkpoint(model, tmp_path / "ref")
    with pytest.raises(ValueError, match="Qwen/Qwen2.5-Math-7B"):
        _import(settings, path=str(ckpt))


def test_missing_transcoder_tensor_is_refused(settings: Settings, tmp_path: Path) -> None:
    model, base, target = _save_pair(tmp_path)
    ckpt = save_reference_checkpoint(model, tmp_path / "ref")
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys() if k != "model.layers.1.mlp.transcoder_enc.weight"}
    save_file(tensors, str(ckpt / "model.safetensors"))
    for verify in ("tensors", "full"):
        with pytest.raises(ValueError, match="transcoder"):
            _import(settings, path=str(ckpt), base_model=base, target_model=target, verify=verify)
    assert _run(settings, "ref") is None


def test_target_of_another_geometry_is_refused(settings: Settings, tmp_path: Path) -> None:
    model, base, target = _save_pair(tmp_path)
    ckpt = save_reference_checkpoint(model, tmp_path / "ref")
    cfg = json.loads((Path(target) / "config.json").read_text())
    cfg["num_hidden_layers"] = 5
    (Path(target) / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_hidden_layers|n_layers"):
        _import(settings, path=str(ckpt), base_model=base, target_model=target, verify="tensors")


def test_hub_id_offline_and_not_cached_names_the_fix(settings: Settings) -> None:
    with pytest.raises(FileNotFoundError, match="huggingface-cli download nathu0/not-a-cached-repo"):
        _import(settings, path="nathu0/not-a-cached-repo", base_model="a/b", target_model="c/d")


def test_cli_import_adapters(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.cli import app

    model, base, target = _save_pair(tmp_path)
    ckpt = save_reference_checkpoint(model, tmp_path / "ref")
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("ADAPTERLENS_DATA_DIR", str(settings.data_dir))
    runner = CliRunner()
    ok = runner.invoke(app, ["import-adapters", str(ckpt), "--base", base, "--target", target, "--name", "cli"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output[ok.output.index("{"):])["name"] == "cli"
    bad = runner.invoke(app, ["import-adapters", str(tmp_path / "nowhere"), "--base", base, "--target", target])
    assert bad.exit_code == 2 and "not a directory" in bad.output


def test_l1_from_released_names() -> None:
    assert l1_from_name("nathu0/transcoder-adapters-R1-Distill-Qwen-7B-l1w0.0003-l0-0.4") == 0.0003
    assert l1_from_name("/data/checkpoints/my-run") is None


def test_a_worker_runs_a_queued_import(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`import-adapters --queue` hands the job to a worker, which finds the handler without being told."""
    from app.cli import app
    from app.db import queue
    from worker.loop import run_worker

    model, base, target = _save_pair(tmp_path)
    ckpt = save_reference_checkpoint(model, tmp_path / "queued")
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("ADAPTERLENS_DATA_DIR", str(settings.data_dir))
    out = CliRunner().invoke(app, ["import-adapters", str(ckpt), "--base", base, "--target", target, "--queue"])
    assert out.exit_code == 0, out.output
    job_id = int(out.output.split("queued job ")[1].split()[0])
    assert run_worker(settings, wait=False, migrate=False) == 1  # default handler discovery
    engine = make_engine(settings)
    try:
        job = queue.get_job(engine, job_id)
    finally:
        engine.dispose()
    assert job.status.value == "succeeded", job
    assert _run(settings, "queued").status == "trained"


def test_target_not_on_disk_yet_is_registered_unchecked(settings: Settings, tmp_path: Path) -> None:
    """The released adapters can be registered before the ~30 GB pair is downloaded; the geometry check waits."""
    model, base, _ = _save_pair(tmp_path)
    ckpt = save_reference_checkpoint(model, tmp_path / "early")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(cfg | {"_name_or_path": "/authors/scratch/r1-distill"}))
    with pytest.raises(ValueError, match="has no tokenizer: give its target"):  # _name_or_path is not trusted
        _import(settings, path=str(ckpt), base_model=base, verify="tensors")
    out = _import(settings, path=str(ckpt), base_model=base, target_model="someorg/not-downloaded-yet",
                  verify="tensors")
    assert out["target_checked"] is False and _run(settings, "early").status == "trained"


# -- a released checkpoint is the adapter model: its own weights, nothing else named ---------------------


def _released(tmp: Path, arch: str = "qwen2"):
    """A released-format checkpoint with its tokenizer (as the paper's repos hold), its target saved beside."""
    import random

    from tests.user_pair import build_model, build_tokenizer, trace

    rng = random.Random(0)
    tokenizer = build_tokenizer([trace(rng)[1] for _ in range(60)])
    base, target = build_model(arch, tokenizer, 0), build_model(arch, tokenizer, 1)
    target.save_pretrained(tmp / "target-f32")
    model = randomize_adapters(build_adapter_model(base, target, AdapterConfig(n_features=16)), seed=3)
    ckpt = save_reference_checkpoint(model, tmp / "released-l1w0.001", max_shard_size="100KB", tokenizer=tokenizer)
    return ckpt, tokenizer


def _checkpoint_logits(ckpt: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits computed from the checkpoint's tensors alone: a plain model with its weights, plus per layer
    ``mlp(x) + transcoder_dec(relu(transcoder_enc(x)))`` (the reference forward)."""
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModelForCausalLM

    from training.checkpoint import reference_weight_map

    tensors = {}
    for name, fname in reference_weight_map(ckpt).items():
        with safe_open(str(ckpt / fname), framework="pt") as fh:
            tensors[name] = fh.get_tensor(name)
    cfg = AutoConfig.from_pretrained(str(ckpt))
    cfg.architectures = None
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    hf.load_state_dict({k: v for k, v in tensors.items() if "transcoder" not in k}, strict=True)
    for i, layer in enumerate(hf.model.layers):
        t = {p: tensors[f"model.layers.{i}.mlp.transcoder_{p}"] for p in ("enc.weight", "enc.bias", "dec.weight", "dec.bias")}
        layer.mlp.register_forward_hook(lambda m, inp, out, t=t: out + F.linear(
            F.relu(F.linear(inp[0], t["enc.weight"], t["enc.bias"])), t["dec.weight"], t["dec.bias"]))
    with torch.no_grad():
        return hf(input_ids=ids).logits


def test_released_checkpoint_imports_alone_and_computes_its_own_logits(settings: Settings, tmp_path: Path) -> None:
    from worker.models_cache import get_run_model

    ckpt, tokenizer = _released(tmp_path)
    out = _import(settings, path=str(ckpt))  # nothing else named
    assert out["target_model"] is None and out["target_agreement"] is None
    run = _run(settings, ckpt.name)
    assert run.config["tokenizer"] == str(ckpt.resolve()) and run.config["chat"]["template"].count("{prompt}") == 1
    model, tok = get_run_model(settings, run.id)
    ids = torch.tensor([tokenizer("<｜User｜>What is 3 + 4?<｜Assistant｜><think>\n3 plus 4. Wait,")["input_ids"]])
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    assert torch.allclose(ours, _checkpoint_logits(ckpt, ids), atol=1e-5, rtol=1e-5)
    text = "<｜User｜>What is 5 + 6?<｜Assistant｜>"
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]  # the checkpoint's own tokenizer
    with pytest.raises(RuntimeError, match="target mode"):  # no target named: the target cannot run
        with model.mode("target"):
            model(input_ids=ids)


def test_a_named_target_is_checked_against_the_checkpoint_and_lends_only_its_mlps(settings: Settings,
                                                                                   tmp_path: Path) -> None:
    """A bf16 copy of the target against a float32 checkpoint: the import reports how far they are apart, and
    the adapter model still computes the checkpoint's logits (not the copy's)."""
    from transformers import AutoModelForCausalLM

    from worker.models_cache import get_run_model

    ckpt, tokenizer = _released(tmp_path)
    bf16 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "target-f32"), dtype=torch.bfloat16)
    bf16.save_pretrained(tmp_path / "target-bf16")
    tokenizer.save_pretrained(tmp_path / "target-bf16")
    out = _import(settings, path=str(ckpt), target_model=str(tmp_path / "target-bf16"), name="with-target")
    agree = out["target_agreement"]
    assert agree["tensors"] > 0 and agree["dtype"] == {"checkpoint": "float32", "target": "bfloat16"}
    assert 1e-5 < agree["max_abs_diff"] < 0.05 and agree["max_rel_diff"] < 1e-2  # bf16 rounding, no more
    assert _run(settings, "with-target").config["imported"]["target_agreement"] == agree
    ids = torch.tensor([tokenizer("<｜User｜>What is 3 + 4?<｜Assistant｜><think>\n")["input_ids"]])
    model, _ = get_run_model(settings, _run(settings, "with-target").id)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.mode("target"):
            target = model(input_ids=ids).logits
    assert torch.allclose(adapted, _checkpoint_logits(ckpt, ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(adapted, target, atol=1e-3)  # target mode runs the target's MLPs
