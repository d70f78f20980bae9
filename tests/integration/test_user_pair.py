"""A user's own pair, end to end, as a user runs it: ``adapterlens pipeline --base --target --data`` on a new
data directory (tiny random Llama and Qwen2 pairs written by ``save_pretrained``, a tokenizer smaller than
``vocab_size``, a DeepSeek-R1-style chat template), then ``adapterlens serve``, and every page of each run.

Both runs share one data directory: the first pipeline meets a new one (nothing migrated), the second an
existing one. Small on purpose (2 layers, d 48, 350 short texts, 60 steps): about a minute on one core.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.user_pair import VOCAB_SIZE, UserPair, write_user_pair

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["--preset", "organism-tiny", "--set", "max_steps=60", "--set", "lr=1e-2", "--set", "adapter.n_features=32"]
SMALL = ["--n-prompts", "8", "--n-graphs", "2", "--max-new-tokens", "16"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, UserPair]:
    root = tmp_path_factory.mktemp("pairs")
    return {arch: write_user_pair(root / arch, arch, seed=i) for i, arch in enumerate(("llama", "qwen2"))}


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERLENS_") and k != "DATABASE_URL"}
    return env | {"ADAPTERLENS_DATA_DIR": str(data_dir), "ADAPTERLENS_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
                  "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _cli(env: dict[str, str], *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"adapterlens {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    assert "Traceback" not in out.stderr, out.stderr[-5000:]
    return out.stdout


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _serve(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 60
    while time.monotonic() < end:
        assert proc.poll() is None, f"serve exited:\n{proc.stdout.read() if proc.stdout else ''}"
        try:
            _get(f"{base}/api/runs")
            return proc, base
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("serve did not answer within 60 s")


def _check_run_pages(base: str, run_id: int, n_tokens: int) -> dict:
    """Every page of a run answers 200, with features, examples and a graph that keeps a feature node."""
    pages = {}
    for path in ("", "/features", "/ablations"):
        status, body = _get(f"{base}/runs/{run_id}{path}")
        assert status == 200, (path, body[:500])
        status, body = _get(f"{base}/api/runs/{run_id}{path}")
        assert status == 200, (path, body[:500])
        pages[path] = json.loads(body)
    run = pages[""]
    assert run["run"]["status"] == "collected" and run["n_collected"] == 2 * 32
    assert run["evaluation"]["kl_gap_closed"] is not None and run["graphs"] and run["feature_sets"]
    features = pages["/features"]["rows"]
    assert features
    feature = None
    for row in features:
        status, body = _get(f"{base}/api/runs/{run_id}/features/{row['layer']}/{row['index']}")
        assert status == 200
        feature = json.loads(body)
        if feature["examples"]["top"]:
            break
    assert feature["examples"]["top"], "no feature has examples"
    assert _get(f"{base}/runs/{run_id}/features/{feature['feature']['layer']}/{feature['feature']['index']}")[0] == 200
    lens_ids = [t["id"] for t in feature["logit_top"] + feature["logit_bottom"]]
    assert lens_ids and max(lens_ids) < n_tokens, "a padded vocabulary id is listed as a token"
    n_feature_nodes = 0
    for graph in run["graphs"]:
        for path in (f"/runs/{run_id}/graphs/{graph['id']}", f"/api/runs/{run_id}/graphs/{graph['id']}/circuit-tracer.json"):
            assert _get(base + path)[0] == 200, path
        status, body = _get(f"{base}/api/runs/{run_id}/graphs/{graph['id']}")
        assert status == 200
        n_feature_nodes = max(n_feature_nodes, sum(n["kind"] == "feature" for n in json.loads(body)["nodes"]))
    assert n_feature_nodes >= 1, "no graph keeps a feature node"
    return run


def test_pipeline_on_a_new_data_directory_then_serve(pairs: dict[str, UserPair], tmp_path: Path) -> None:
    data_dir = tmp_path / "new-data-dir"  # does not exist yet: nothing is migrated
    env = _env(data_dir)
    llama, qwen = pairs["llama"], pairs["qwen2"]
    assert llama.n_tokens < VOCAB_SIZE
    out = _cli(env, "pipeline", "--base", str(llama.base), "--target", str(llama.target), "--data", str(llama.texts),
               "--prompts", str(llama.prompts), "--run", "llama", *TRAIN, *SMALL)
    assert "KL gap closed" in out and "held-out texts" in out
    # the second pair on the now existing directory: prompts cut from the held-out texts, the run's own words
    _cli(env, "pipeline", "--base", str(qwen.base), "--target", str(qwen.target), "--data", str(qwen.texts),
         "--run", "qwen2", "--hesitation-words", "Wait, Hmm, Actually", *TRAIN, *SMALL)

    server, base = _serve(env)
    try:
        runs = {r["name"]: r["id"] for r in json.loads(_get(f"{base}/api/runs")[1])["runs"]}
        assert set(runs) == {"llama", "qwen2"}
        llama_run = _check_run_pages(base, runs["llama"], llama.n_tokens)
        qwen_run = _check_run_pages(base, runs["qwen2"], qwen.n_tokens)
        assert _get(f"{base}/jobs")[0] == 200
        status, html = _get(f"{base}/runs/{runs['llama']}")
        assert "held-out texts" in html and "prompts.jsonl" in html  # the table says which rows come from which data
    finally:
        server.terminate()
        log = server.communicate(timeout=30)[0]
    assert "Traceback" not in log, log[-3000:]

    # what each run keeps and measured
    ev = llama_run["evaluation"]
    assert ev["n_prompts"] == 8 and [m["name"] for m in ev["models"]] == ["base", "hybrid", "adapted", "target"]
    assert all(m["accuracy"] is not None for m in ev["models"])  # prompts.jsonl carries answers
    assert qwen_run["config"]["hesitation_words"] == ["Wait", "Hmm", "Actually"]
    for run in (llama_run, qwen_run):
        assert run["config"]["chat"]["template"] == "<｜User｜>{prompt}<｜Assistant｜><think>\n"
        assert run["config"]["chat"]["source"] == "tokenizer chat template"
        assert run["config"]["data"]["heldout"]["fraction"] == 0.1
        assert run["evaluation"]["kl_gap_closed"] > 0.05  # the adapters close part of the gap on held-out texts


def test_train_then_evaluate_a_pair_on_a_new_data_directory(pairs: dict[str, UserPair], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The first command a new user runs (issue 15: it failed with "no such table: runs"), in-process."""
    from typer.testing import CliRunner

    from app.cli import app

    pair = pairs["qwen2"]
    data_dir = tmp_path / "fresh"
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("ADAPTERLENS_DATA_DIR", str(data_dir))  # restored after the test (the CLI exports it)
    monkeypatch.setenv("ADAPTERLENS_DEVICE", "cpu")
    runner = CliRunner()
    out = runner.invoke(app, ["--data-dir", str(data_dir), "train", "--run", "r", "--base", str(pair.base),
                              "--target", str(pair.target), "--data", str(pair.texts), "--preset", "organism-tiny",
                              "--set", "max_steps=3", "--set", "adapter.n_features=8", "--hesitation-words", "Wait"])
    assert out.exit_code == 0, out.output
    assert (data_dir / "adapterlens.db").is_file() and json.loads(out.output[out.output.index("{"):])["steps"] == 3
    out = runner.invoke(app, ["--data-dir", str(data_dir), "evaluate", "--run", "r", "--n-prompts", "2",
                              "--n-texts", "3", "--max-new-tokens", "4", "--prompts", str(pair.prompts)])
    assert out.exit_code == 0, out.output
    assert "held-out texts: 35 of the 350 texts of texts.jsonl held out" in out.output
    assert "hesitations (Wait)" in out.output and "prompts.jsonl" in out.output
    bad = runner.invoke(app, ["--data-dir", str(data_dir), "train", "--run", "r", "--base", str(pair.target),
                              "--target", str(pair.target), "--data", str(pair.texts)])
    assert bad.exit_code == 2 and "exists with another pair" in bad.output
