"""Data-parallel training: two gloo ranks on the CPU train exactly like one process on the whole batch.

The ranks are real processes (``torch.multiprocessing.spawn``, or torchrun for the job path) joined in
a gloo process group; each builds the same tiny Qwen2 pair. The data has sequences of different lengths
and a last batch with fewer rows than ranks, so token-share weighting, the global NMSE denominators and
the idle-rank path are all exercised.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import tiny_pair
from training.adapter import AdapterModel, build_adapter_model
from training.checkpoint import load_adapters
from training.config import AdapterConfig, TrainConfig, apply_overrides, preset
from training.distributed import DataParallel
from training.trainer import train

N_SEQ, BATCH, STEPS = 10, 3, 6  # batches of 3, 3, 3, 1 rows: the 4th leaves rank 1 idle; step 5 is epoch 1


def _data(n: int = N_SEQ) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 64, (int(torch.randint(4, 15, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _model(seed: int = 0) -> AdapterModel:
    torch.manual_seed(seed)  # the adapters' encoder init draws from the global generator
    base, target = tiny_pair(0, layers=2)
    return build_adapter_model(base, target, AdapterConfig(n_features=32))


def _cfg(**over) -> TrainConfig:
    return apply_overrides(preset("organism-tiny"), [
        "adapter.n_features=32", f"batch_size={BATCH}", "lr=3e-3", f"max_steps={STEPS}", "checkpoint_every=2",
        "dead_windows=[4,1000]", *(f"{k}={v}" for k, v in over.items())])


def _rank(rank: int, world: int, init_file: str, run_dir: str, resume: bool, data_sizes: list[int],
          model_seeds: list[int]) -> None:
    """One rank: join the gloo group, train (rank-specific data size / adapter init when a test asks)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        assert DataParallel.current() == DataParallel(rank, world)
        train(_cfg(), _model(model_seeds[rank]), _data(data_sizes[rank]), run_dir=run_dir, resume=resume,
              progress=False)
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path, run_dir: Path, *, resume: bool = False, data_sizes=(N_SEQ, N_SEQ),
           model_seeds=(0, 0)) -> None:
    init_file = tmp_path / f"init-{run_dir.name}"
    mp.spawn(_rank, args=(2, str(init_file), str(run_dir), resume, list(data_sizes), list(model_seeds)),
             nprocs=2, join=True)


def _adapters(run_dir: Path) -> dict[str, torch.Tensor]:
    model = _model()
    load_adapters(model, run_dir / "checkpoint")
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The reference: one process, the whole batch."""
    run_dir = tmp_path_factory.mktemp("single")
    train(_cfg(), _model(), _data(), run_dir=run_dir, progress=False)
    return run_dir


def _assert_same_run(got: Path, want: Path) -> None:
    a, b = _adapters(got), _adapters(want)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-5), (name, (a[name] - b[name]).abs().max())
    assert max((a[n] - _adapters_init()[n]).abs().max() for n in a) > 1e-3  # training moved the adapters
    mg, mw = _metrics(got), _metrics(want)
    assert [m["step"] for m in mg] == [m["step"] for m in mw] == list(range(1, STEPS + 1))
    for x, y in zip(mg, mw, strict=True):
        assert x["tokens"] == y["tokens"] and x["cutoff"] == y["cutoff"]
        assert x["dead_4"] == y["dead_4"] and x["dead_4_layers"] == y["dead_4_layers"]
        for key in ("loss", "kl", "lm", "nmse", "l1", "l0", "grad_norm", "bridge_a2t", "bridge_t2a"):
            assert (x[key] is None) == (y[key] is None), key
            if x[key] is not None:
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (key, x["step"])
        assert x["nmse_points"] == pytest.approx(y["nmse_points"], rel=1e-5)
        assert x["l0_layers"] == pytest.approx(y["l0_layers"], rel=1e-4, abs=1e-4)  # rounded to 4 places


def _adapters_init() -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in _model().named_parameters() if p.requires_grad}


def test_two_ranks_train_like_one_process_on_the_whole_batch(tmp_path, single):
    run_dir = tmp_path / "dp"
    _spawn(tmp_path, run_dir, model_seeds=(0, 5))  # rank 1's own init is replaced by rank 0's
    _assert_same_run(run_dir, single)


def test_two_ranks_resume_a_checkpoint_and_continue_exactly(tmp_path, single):
    run_dir = tmp_path / "resumed"

    def crash_at_3(m: dict) -> None:
        if m["step"] == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):  # one process, checkpoint at step 2
        train(_cfg(), _model(), _data(), run_dir=run_dir, on_step=crash_at_3, progress=False)
    _spawn(tmp_path, run_dir, resume=True)  # both ranks load it and go on to step 6
    _assert_same_run(run_dir, single)


def test_ranks_with_different_data_fail_with_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="ranks disagree on dataset size"):
        _spawn(tmp_path, tmp_path / "bad", data_sizes=(N_SEQ, N_SEQ - 1))
    assert not (tmp_path / "bad" / "checkpoint").exists()


def test_local_rows_split_the_batch_and_cut_trailing_padding():
    ids = torch.arange(12).reshape(3, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    r0 = DataParallel(0, 2).local_rows(ids, mask)
    r1 = DataParallel(1, 2).local_rows(ids, mask)
    assert r0[2] and torch.equal(r0[0], ids[[0, 2], :3]) and torch.equal(r0[1], mask[[0, 2], :3])
    assert r1[2] and torch.equal(r1[0], ids[[1]]) and torch.equal(r1[1], mask[[1]])
    idle = DataParallel(3, 4).local_rows(ids[:2], mask[:2])
    assert not idle[2] and idle[0].shape[0] == 1  # a stand-in row, contributing nothing


# -- the train job through torchrun ------------------------------------------------------------------------

def _char_tokenizer():
    """Byte-level BPE without merges over digits and a few letters: what Qwen2Tokenizer (which
    AutoTokenizer picks for a Qwen2 config) rebuilds from tokenizer.json unchanged."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    symbols = ["<pad>", "<s>", "</s>", "Ġ", *"0123456789", *"abcdefghij"]
    tok = Tokenizer(BPE({w: i for i, w in enumerate(symbols)}, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _store_with_run(tmp_path: Path):
    """A SQLite store with one run (a local tiny pair, JSONL data) and the settings pointing at it."""
    from app.db.migrate import upgrade
    from app.db.session import make_engine, make_sessionmaker
    from app.settings import Settings
    from training.config import train_config_to_dict
    from worker.demo import ensure_run

    base, target = tiny_pair(0, layers=2)
    base.save_pretrained(tmp_path / "base")
    target.save_pretrained(tmp_path / "target")
    _char_tokenizer().save_pretrained(tmp_path / "target")
    texts = [" ".join(f"{(7 * i + j) % 10}{'abcdefghij'[j % 10]}" for j in range(2 + i % 5)) for i in range(N_SEQ)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    settings = Settings(data_dir=tmp_path / "data", device="cpu")
    upgrade(settings.db_url)
    engine = make_engine(settings)
    config = {"train": train_config_to_dict(_cfg(checkpoint_every=4)),
              "data": {"kind": "jsonl", "path": str(tmp_path / "train.jsonl")}}
    with make_sessionmaker(engine)() as s, s.begin():
        run_id = ensure_run(s, name="dp2", base_model=str(tmp_path / "base"), target_model=str(tmp_path / "target"),
                            config=config)
    engine.dispose()
    return settings, run_id


def test_train_job_with_nproc_2_runs_under_torchrun(tmp_path):
    """The job's torchrun path end to end (exactness against one process is the spawn tests' job: the
    ranks here draw their adapter init from fresh processes' generators, not the test's)."""
    from app.db.schema import Run, RunMetric
    from app.db.session import make_engine, make_sessionmaker
    from worker.loop import run_inline
    from worker.train_launch import LOG_FILE, torchrun_command

    assert torchrun_command(Path("s.json"), 2)[1:] == [
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "worker.distributed_train",
        "s.json"]
    settings, run_id = _store_with_run(tmp_path)
    out = run_inline(settings, "train", {"run_id": run_id, "nproc": 2}, show_progress=False,
                     handler_modules=["worker.pipeline"])
    assert out["world_size"] == 2 and out["steps"] == STEPS, (settings.runs_dir / "dp2" / LOG_FILE).read_text()
    engine = make_engine(settings)
    with make_sessionmaker(engine)() as s:
        run = s.get(Run, run_id)
        rows = sorted((m.step, m.metrics) for m in s.query(RunMetric).filter_by(run_id=run_id))
    engine.dispose()
    assert run.status == "trained" and Path(run.checkpoint, "adapters.safetensors").is_file()
    assert [step for step, _ in rows] == list(range(1, STEPS + 1))
    assert rows == [(m["step"], m) for m in _metrics(settings.runs_dir / "dp2")]  # rank 0's lines, once each
    assert all(m["kl"] > 0 and m["tokens"] > 0 for _, m in rows)


def test_a_failing_torchrun_fails_the_job_with_the_rank_error(tmp_path):
    from worker.loop import run_inline
    from worker.train_launch import DistributedTrainError

    settings, run_id = _store_with_run(tmp_path)
    shutil.move(tmp_path / "train.jsonl", tmp_path / "gone.jsonl")  # every rank fails to read the data
    with pytest.raises(DistributedTrainError, match=r"(?s)exited with status 1.*training data file not found"):
        run_inline(settings, "train", {"run_id": run_id, "nproc": 2}, show_progress=False,
                   handler_modules=["worker.pipeline"])
