"""A mid-size random Qwen2 pair (8 layers, d 512, vocab 32k) through train → collect → attribute on the CPU.

The organism is 4 layers × d 128; the paper's pair is 28 × 3584 with a 152k vocabulary. This run sits
between them, so shape-dependent code paths (chunked head + KL over a 32k vocabulary, multi-batch
collection, attribution rounds) run on something bigger than a toy without a GPU or a download:
random weights saved with ``save_pretrained`` and loaded back through the same loaders as real models.
Run with ``pytest -m slow tests/slow/test_midsize_cpu.py`` (measured on 2 busy shared cores: train 3 steps 82 s, collect + write 94 s, attribute + prune 40 s).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select
from transformers import Qwen2Config, Qwen2ForCausalLM

from app.db.schema import Feature, Run
from app.db.session import make_engine, make_sessionmaker
from training.checkpoint import load_adapters
from training.config import AdapterConfig, TrainConfig
from training.models import load_adapter_model
from training.trainer import train
from worker.attribution import attribute, prune_graph
from worker.collect import collect, write_collection

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

LAYERS, D, MLP, VOCAB, FEATURES = 8, 512, 1376, 32000, 1024  # MLP ≈ 2.7 d, as in Qwen2.5-7B


def _random_qwen2(seed: int) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=D, intermediate_size=MLP, num_hidden_layers=LAYERS,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, use_sliding_window=False, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("midsize")
    _random_qwen2(0).save_pretrained(root / "base")
    _random_qwen2(1).save_pretrained(root / "target")
    return str(root / "base"), str(root / "target")


def test_train_collect_attribute_midsize(pair: tuple[str, str], sqlite_db_url: str, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    base, target = pair
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, VOCAB, (int(n),), generator=g).tolist()
                 for n in torch.randint(32, 64, (12,), generator=g)]

    t0 = time.perf_counter()
    model = load_adapter_model(base, target, AdapterConfig(n_features=FEATURES), device="cpu")
    cfg = TrainConfig(adapter=AdapterConfig(n_features=FEATURES), batch_size=2, max_seq_len=64, max_steps=3,
                      kl_chunk=64, checkpoint_every=3, lr=1e-3)
    result = train(cfg, model, sequences, run_dir=tmp_path / "run", progress=False, base_name=base, target_name=target)
    t1 = time.perf_counter()
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.final[k])) for k in ("loss", "kl", "nmse"))
    assert any(float(ad.W_dec.abs().sum()) > 0 for ad in model.adapters)  # W_dec starts at zero: it moved

    # A fresh load of the checkpoint is what a worker would collect and attribute with.
    model = load_adapters(load_adapter_model(base, target, AdapterConfig(n_features=FEATURES), device="cpu"),
                          result.checkpoint_dir).eval()
    collection = collect(model, sequences, top_k=5, n_random=2, ctx_before=8, ctx_after=4, batch_size=8,
                         max_batch_tokens=1024)
    assert collection.layers == list(range(LAYERS))
    engine = make_engine(sqlite_db_url)
    try:
        with make_sessionmaker(engine)() as s, s.begin():
            run = Run(name="midsize", base_model=base, target_model=target, config={}, status="trained",
                      checkpoint=str(result.checkpoint_dir), n_layers=LAYERS, n_features=FEATURES, d_model=D)
            s.add(run)
            s.flush()
            run_id = run.id
        counts = write_collection(engine, run_id, collection)
        with make_sessionmaker(engine)() as s:
            n_features = s.scalar(select(func.count()).select_from(Feature).where(Feature.run_id == run_id))
    finally:
        engine.dispose()
    assert n_features == LAYERS * FEATURES and counts
    t2 = time.perf_counter()

    prompt = torch.tensor(sequences[0][:24])
    graph = attribute(model, prompt, max_feature_nodes=256, max_n_logits=5, batch_size=64, progress=False)
    pruned = prune_graph(graph)
    t3 = time.perf_counter()
    assert graph.n_feature_nodes > 0 and graph.n_logits >= 1
    assert 0 < len(pruned.nodes) <= graph.n_nodes and pruned.links
    assert all(torch.isfinite(torch.tensor(w)) for _, _, w in pruned.links)
    log.warning("midsize CPU: train %d steps %.1f s, collect+write %.1f s, attribute+prune %.1f s (%d nodes)",
                result.steps, t1 - t0, t2 - t1, t3 - t2, graph.n_nodes)
