"""A small deterministic world in the store for the web tests, browser tests and screenshots.

Everything comes from ``random.Random(42)``: two runs (an empty one, then ``demo`` with 3 layers × 16
features), examples whose tokens include ``<script>`` and ``"`` (escaping must hold), training metrics,
an evaluation, prompts, one attribution graph, the hesitation feature set, a finished ablation, an
experiment and jobs in every state. A byte-level ``tokenizer.json`` is written beside it so token ids
decode as they would for a real run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.db.graphs import index_graph_features
from app.db.schema import (
    Ablation,
    AblationToken,
    Base,
    Example,
    Experiment,
    ExperimentRow,
    Feature,
    FeatureSet,
    FeatureSetMember,
    FeatureToken,
    Graph,
    Job,
    JobStatus,
    Prompt,
    Run,
    RunMetric,
    Worker,
    utcnow,
)
from app.web.tokens import _bytes_to_unicode

N_LAYERS, N_FEATURES = 3, 16
SCRIPT_FEATURE = (1, 3)  # its top example's focus token is "<script>", followed by '"'
ADDED = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
WORDS = [
    "The", " answer", " is", " ", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", " +", " =", ".", ",", "\n\n", "\n",
    " Wait", "Wait", " wait", " Hmm", " Actually", " But", " so", " check", " again", " let", " me", " add", " carry",
    "<script>", '"', "&amp;", " <b>", "alert(1)", "</script>", " café", " the", " sum", " first", " digit", " ok",
    " So", " total", " we", " get", " Let",
]
VOCAB = ADDED + WORDS  # id = position in this list
TOK = {t: i for i, t in enumerate(VOCAB)}


@dataclass(frozen=True)
class World:
    run_id: int
    empty_run_id: int
    graph_id: int
    set_id: int
    ablation_id: int
    experiment_id: int
    job_ids: dict[str, int]
    tokenizer_dir: Path
    script_feature: tuple[int, int] = SCRIPT_FEATURE


def write_tokenizer(directory: Path) -> Path:
    """A byte-level BPE ``tokenizer.json`` over ``VOCAB``, written by the ``tokenizers`` library as a real run's is."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    directory.mkdir(parents=True, exist_ok=True)
    b2u = _bytes_to_unicode()
    vocab = {"".join(b2u[b] for b in t.encode()) if t not in ADDED else t: i for i, t in enumerate(VOCAB)}
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=i < 2, normalized=False) for i, t in enumerate(ADDED)])
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path


def _ids(*tokens: str) -> list[int]:
    return [TOK[t] for t in tokens]


def _sentence(rng: random.Random, n: int) -> list[int]:
    pool = [TOK[t] for t in WORDS if t not in ("<script>", '"', "</script>", "alert(1)")]
    return [rng.choice(pool) for _ in range(n)]


def seed_world(engine: Engine, tokenizer_dir: Path) -> World:
    """Create the tables if needed and fill them with the world; returns the ids tests need."""
    Base.metadata.create_all(engine)
    write_tokenizer(tokenizer_dir)
    rng = random.Random(42)
    now = utcnow()
    with Session(engine, expire_on_commit=False) as s, s.begin():
        empty = Run(name="empty-run", base_model="base-x", target_model="target-x", config={}, status="created",
                    created=now - timedelta(days=1))
        s.add(empty)
        s.flush()
        run = Run(name="demo", base_model="organism/base", target_model="organism/target", status="ready",
                  config={"tokenizer": str(tokenizer_dir), "adapter": {"n_features": N_FEATURES}, "lr": 8e-4},
                  n_layers=N_LAYERS, n_features=N_FEATURES, d_model=32, checkpoint="data/runs/demo/adapter.safetensors",
                  evaluation=_evaluation(rng))
        s.add(run)
        s.flush()
        rid = run.id
        for step in range(0, 200, 5):
            loss = 3.0 * (0.98 ** step) + rng.random() * 0.05
            s.add(RunMetric(run_id=rid, step=step, metrics={
                "loss": loss, "kl": loss * 0.6, "lm_loss": 2.0 + loss * 0.2, "l0": 8 * (0.99 ** step) + 1,
                "nmse": [0.5 * (0.985 ** step) * (1 + 0.1 * i) for i in range(N_LAYERS)],
                "bridge_a2t": loss * 0.3, "bridge_t2a": loss * 0.25, "k": rng.randint(0, N_LAYERS), "lr": 8e-4,
            }))
        prompt_ids = _ids("<｜begin▁of▁sentence｜>", "<｜User｜>", "3", " +", "4", "<｜Assistant｜>", "<think>", "\n",
                          "The", " sum", " is", " ", "7", ".", "\n\n")
        prompt = Prompt(run_id=rid, source="eval", text="3 + 4", token_ids=prompt_ids,
                        regions=[[0, 6, "prompt"], [6, 7, "think_start"], [7, 15, "thinking"]], answer="7")
        s.add(prompt)
        s.flush()
        categories = ["hesitation", "formatting", "digits", None]
        for layer in range(N_LAYERS):
            for index in range(N_FEATURES):
                _add_feature(s, rng, rid, layer, index, categories[(layer * N_FEATURES + index) % 4], prompt.id)
        graph = _graph(rng, rid, prompt)
        s.add(graph)
        s.flush()
        index_graph_features(s, graph.id, rid, graph.nodes)
        hset = FeatureSet(run_id=rid, name="hesitation", description="features the 'Wait' token depends on",
                          summary=_study_summary())
        s.add(hset)
        s.flush()
        for layer, index, role in [(0, 2, "template"), (1, 3, "output"), (1, 5, "template"), (2, 7, "output"),
                                   (2, 9, "output")]:
            s.add(FeatureSetMember(set_id=hset.id, layer=layer, index=index, role=role, score=rng.random()))
        jobs = _jobs(s, rng, rid)
        # The request as app/db/requests.py stores it (a ResolvedAblation dump).
        request = {
            "request": {"run_id": rid, "prompt": "3 + 4", "features": [[1, 3], [2, 7]], "mode": "zero", "value": None,
                        "positions": "all", "feature_set": None, "roles": None, "layers": [], "complement": False,
                        "prompt_id": None, "example_id": None, "prompt_tokens": None, "chat": True, "answer": None,
                        "generation": {"max_new_tokens": 12, "temperature": 0.0, "seed": 0}, "compare": []},
            "selection": {"features": [[1, 3], [2, 7]], "all_layers": [], "complement": False, "mode": "zero",
                          "value": 0.0, "positions": "all"},
            "prompt_ids": None, "prompt_text": "<｜User｜>3 + 4<｜Assistant｜><think>\n", "answer": None,
        }
        ablation = Ablation(run_id=rid, job_id=jobs["ablate"], status="done", finished=now, request=request,
                            summary={"first_divergence": 3, "answer_changed": False})
        s.add(ablation)
        s.flush()
        unablated = ["The", " sum", " is", " Wait", ",", " let", " me", " check", " again", ".", " 7", "."]
        ablated = ["The", " sum", " is", " ", "7", ".", " So", " the", " answer", " is", " 7", "."]
        for cond, toks in (("unablated", unablated), ("ablated", ablated)):
            for step, t in enumerate(toks):
                tid = TOK.get(t, TOK["7"])
                kl = (rng.random() * (2.0 if step >= 3 else 0.05)) if cond == "ablated" else None
                s.add(AblationToken(ablation_id=ablation.id, condition=cond, step=step, token_id=tid,
                                    token_str=t if t in TOK else "7", logprob=-rng.random() * 2, kl=kl))
        exp = Experiment(run_id=rid, name="ablate hesitation set", request={"set": "hesitation", "mode": "zero"},
                         status="succeeded", summary={"prompts": 8}, finished=now)
        s.add(exp)
        s.flush()
        for p in range(8):
            for cond, base_len, hes in (("baseline", 60, 2), ("ablated", 38, 0)):
                s.add(ExperimentRow(experiment_id=exp.id, prompt_idx=p, condition=cond,
                                    response_len=base_len + rng.randint(-10, 10), hesitations=max(0, hes + rng.randint(-1, 1)),
                                    correct=rng.random() < 0.8, answer=str(rng.randint(0, 20)),
                                    meta={"prompt": f"{p} + 7 = ?"} if p else {}))  # row 0: written before prompts were kept
        s.add(Worker(id="worker-test", hostname="localhost", pid=1234, heartbeat_at=now))
    return World(run_id=rid, empty_run_id=empty.id, graph_id=graph.id, set_id=hset.id, ablation_id=ablation.id,
                 experiment_id=exp.id, job_ids=jobs, tokenizer_dir=tokenizer_dir)


def _evaluation(rng: random.Random) -> dict:
    def model(kl: float, hes: float, length: float, acc: float) -> dict:
        return {"kl_to_target": kl, "nmse_per_layer": [kl / 3] * N_LAYERS, "hesitation_rate": hes,
                "hesitations_per_token": {"Wait": hes}, "mean_response_len": length, "accuracy": acc}

    return {
        "models": {"base": model(1.2, 0.0, 31.0, 0.55), "hybrid": model(0.42, 0.05, 40.0, 0.6),
                   "adapted": model(0.09, 0.61, 58.0, 0.78), "target": model(0.0, 0.7, 61.0, 0.82)},
        "kl_gap_closed": 1 - 0.09 / 0.42, "reproduced_hesitation": 0.8, "false_hesitation": 0.1, "same_output": 0.35,
        "l0_per_layer": [3.1, 4.2, 2.7], "l0_mean": 3.33, "dead_features_per_layer": [1, 0, 2], "n_prompts": 64,
        "n_tokens": 4096, "extra": {},
    }


def _add_feature(s: Session, rng: random.Random, rid: int, layer: int, index: int, category: str | None,
                 prompt_id: int) -> None:
    max_act = round(2 + rng.random() * 8, 3)
    top = [[TOK[t], t, round(3 - 0.3 * k + rng.random() * 0.1, 3)] for k, t in enumerate(rng.sample(WORDS, 10))]
    bottom = [[TOK[t], t, round(-3 + 0.3 * k - rng.random() * 0.1, 3)] for k, t in enumerate(rng.sample(WORDS, 10))]
    if (layer, index) == (2, 7):
        top[0] = [TOK[" Wait"], " Wait", 4.2]
    if (layer, index) == (0, 0):  # the collector writes null text when it had no decoder
        top = [[tid, None, v] for tid, _, v in top]
    neighbours = [[rng.randrange(N_LAYERS), rng.randrange(N_FEATURES), round(rng.uniform(0.2, 0.9), 3)] for _ in range(5)]
    s.add(Feature(
        run_id=rid, layer=layer, index=index, frequency=round(rng.random() ** 3 * 0.2, 5), max_act=max_act,
        mean_act=round(max_act * 0.3, 3), category=category,
        label=f"fires on {rng.choice(['digits', 'newlines', 'hedging', 'the answer'])}" if index % 3 else None,
        histogram={"edges": [0.01 * 2 ** k for k in range(11)], "counts": [rng.randint(0, 500) for _ in range(10)]},
        logit_lens={"top": top, "bottom": bottom},
        region_counts={"prompt": rng.randint(0, 50), "thinking": rng.randint(0, 300), "answer": rng.randint(0, 40)},
        think_pos_hist={"edges": [k / 10 for k in range(11)], "counts": [rng.randint(0, 40) for _ in range(10)]},
        neighbours=neighbours,
        # not drawn from rng (the other seeded values stay as they were); (2, 7) promotes " Wait" the most
        hesitation_lens=None if (layer, index) == (0, 0) else 4.2 if (layer, index) == (2, 7)
        else round(((layer * 31 + index * 17) % 23) / 10 - 1, 3),
    ))
    promoted: dict[int, tuple[int, float]] = {}
    for rank, (tid, _, value) in enumerate(top):  # as the collect writer fills feature_tokens
        promoted.setdefault(tid, (rank, value))
    for tid, (rank, value) in promoted.items():
        s.add(FeatureToken(run_id=rid, relation="promotes", token_id=tid, layer=layer, index=index, rank=rank,
                           value=value))
    fires: dict[int, tuple[int, float]] = {}
    for kind, n in (("top", 5), ("random", 3)):
        for rank in range(n):
            ids = _sentence(rng, 30)
            focus = rng.randrange(8, 24)
            if (layer, index) == SCRIPT_FEATURE and kind == "top" and rank == 0:
                ids[focus:focus + 5] = _ids("<script>", '"', "alert(1)", '"', "</script>")
            acts = [0.0 if rng.random() < 0.7 else round(rng.random() * max_act * 0.5, 3) for _ in ids]
            acts[focus] = round(max_act * (1 - 0.1 * rank) if kind == "top" else max_act * rng.random(), 3)
            s.add(Example(run_id=rid, layer=layer, index=index, kind=kind, rank=rank, token_ids=ids, acts=acts,
                          focus=focus, prompt_id=prompt_id if rank == 0 else None, max_act=max(acts)))
            if kind == "top":
                old = fires.get(ids[focus])
                fires[ids[focus]] = (rank, acts[focus]) if old is None else (old[0], max(old[1], acts[focus]))
    for band in (4, 7):  # quantile examples as collect stores them: rank = band * 100 + place in the band
        ids = _sentence(rng, 20)
        focus = 10
        acts = [0.0] * len(ids)
        acts[focus] = round(0.5 * (10 ** (-2 + band / 2) + 10 ** (-2 + (band - 1) / 2)), 4)
        s.add(Example(run_id=rid, layer=layer, index=index, kind="quantile", rank=band * 100, token_ids=ids,
                      acts=acts, focus=focus, prompt_id=None, max_act=max(acts)))
    for tid, (rank, value) in fires.items():
        s.add(FeatureToken(run_id=rid, relation="fires_on", token_id=tid, layer=layer, index=index, rank=rank,
                           value=value))


def _graph(rng: random.Random, rid: int, prompt: Prompt) -> Graph:
    """A frozen-mlp graph as the attribute job stores it: features (two of them at two positions), error
    nodes, embeddings, two logits (" Wait", the target, and "7"); cumulative influence by rank."""
    n_pos = len(prompt.token_ids)
    nodes = [{"node_id": f"E_{tid}_{p}", "feature": p, "layer": "E", "ctx_idx": p, "feature_type": "embedding",
              "jsNodeId": f"E_{tid}-{p}", "clerp": ""} for p, tid in enumerate(prompt.token_ids)]
    chosen = [(1, 3, 14), (2, 7, 14), (2, 9, 14), (0, 2, 13), (1, 5, 13), (1, 3, 13), (2, 7, 12), (0, 4, 12),
              (1, 8, 14), (2, 1, 12)]  # most influential first
    errors = [(0, 14), (1, 14), (2, 13)]
    ranked = [("f", c) for c in chosen[:3]] + [("e", errors[0])] + [("f", c) for c in chosen[3:6]] + \
        [("e", errors[1])] + [("f", c) for c in chosen[6:]] + [("e", errors[2])]
    for rank, (kind, item) in enumerate(ranked):
        influence = round(0.25 + 0.55 * rank / (len(ranked) - 1), 3)  # cumulative share, 0.25 … 0.8
        if kind == "f":
            layer, index, pos = item
            nodes.append({"node_id": f"{layer}_{index}_{pos}", "feature": (layer + index) * (layer + index + 1) // 2 + index,
                          "layer": str(layer), "ctx_idx": pos, "feature_type": "cross layer transcoder",
                          "jsNodeId": f"{layer}_{index}-0", "clerp": "", "influence": influence,
                          "activation": round(0.5 + rng.random() * 5, 3)})
        else:
            layer, pos = item
            nodes.append({"node_id": f"{layer}_-1_{pos}", "feature": -1, "layer": str(layer), "ctx_idx": pos,
                          "feature_type": "mlp reconstruction error", "jsNodeId": f"{layer}_-1-{pos}", "clerp": "",
                          "influence": influence})
    wait, seven = TOK[" Wait"], TOK["7"]
    for tok, text, prob, target in ((wait, " Wait", 0.412, True), (seven, "7", 0.301, False)):
        nodes.append({"node_id": f"{N_LAYERS + 1}_{tok}_{n_pos - 1}", "feature": tok, "layer": str(N_LAYERS + 1),
                      "ctx_idx": n_pos - 1, "feature_type": "logit", "jsNodeId": f"L_{tok}-{n_pos - 1}",
                      "clerp": f'Output "{text}" (p={prob:.3f})', "token_prob": prob, "is_target_logit": target})
    logits = [n["node_id"] for n in nodes if n["feature_type"] == "logit"]
    feats = [n for n in nodes if n["feature_type"] == "cross layer transcoder"]
    errs = [n for n in nodes if n["feature_type"] == "mlp reconstruction error"]
    embeds = [n["node_id"] for n in nodes if n["feature_type"] == "embedding"]
    links = []
    for f in feats:
        layer, pos = int(f["layer"]), f["ctx_idx"]
        sources = rng.sample(embeds[:pos + 1], 2) + [g["node_id"] for g in feats + errs
                                                     if int(g["layer"]) < layer and g["ctx_idx"] <= pos]
        for src in sources:
            links.append({"source": src, "target": f["node_id"], "weight": round(rng.uniform(-1, 1.5), 3)})
        for lg in logits:
            links.append({"source": f["node_id"], "target": lg, "weight": round(rng.uniform(-0.5, 2), 3)})
    for e in errs:
        links.append({"source": e["node_id"], "target": logits[0], "weight": round(rng.uniform(-0.5, 0.5), 3)})
    return Graph(run_id=rid, slug="demo-wait-0", prompt_id=prompt.id, prompt="3 + 4", target_token_id=wait,
                 target_token_str=" Wait", position=n_pos - 1,
                 params={"mode": "frozen-mlp", "node_threshold": 0.8, "edge_threshold": 0.98, "max_feature_nodes": 10000,
                         "logit_diff": [wait, seven], "n_error_nodes": N_LAYERS * n_pos,
                         "prompt_token_ids": list(prompt.token_ids),
                         "study": {"word": "Wait", "group": "add", "trace": 0, "position": n_pos, "prompt_len": 7}},
                 nodes=nodes, links=links,
                 scores={"replacement": 0.61, "completeness": 0.83, "feature_influence_share": 0.57,
                         "n_nodes": len(nodes), "n_links": len(links), "n_pruned_features": len(feats)})


def _study_summary() -> dict:
    """A hesitation study's result as the job stores it with its set (the shape run pages read)."""
    def cond(n: int, rate: float, tokens: int, acc: float, length: float, groups: dict | None = None) -> dict:
        return {"n": n, "hesitation_rate": rate, "hesitation_tokens": tokens, "accuracy": acc, "mean_length": length,
                "by_group": groups or {}}

    by = {"add": {"n": 4, "hesitation_rate": 0.75, "hesitation_tokens": 3, "accuracy": 1.0, "mean_length": 30.0}}
    by_ablated = {"add": {"n": 4, "hesitation_rate": 0.0, "hesitation_tokens": 0, "accuracy": 0.75, "mean_length": 20.0}}
    return {
        "set": {"name": "hesitation", "size": 5, "n_features": N_LAYERS * N_FEATURES, "fraction": 5 / 48,
                "roles": {"output": 3, "template": 2, "other": 0}},
        "choice": {"reached_target": True, "history": [
            {"size": 1, "removal": 0.4, "hesitation_rate": 0.5, "accuracy": 0.9, "mean_length": 27.0},
            {"size": 3, "removal": 0.8, "hesitation_rate": 0.2, "accuracy": 0.85, "mean_length": 23.0},
            {"size": 5, "removal": 0.96, "hesitation_rate": 0.05, "accuracy": 0.85, "mean_length": 21.0}]},
        "report": {"target": cond(8, 0.75, 6, 1.0, 31.0), "adapted": cond(8, 0.75, 6, 0.95, 30.0, by),
                   "ablated": cond(8, 0.0, 0, 0.9, 20.0, by_ablated), "removal": 1.0,
                   "control": {**cond(8, 0.75, 6, 0.95, 30.0), "removal": 0.0, "size": 5}},
        "sites": {"n_graphs": 1}, "words": ["Wait"],
    }


def _jobs(s: Session, rng: random.Random, rid: int) -> dict[str, int]:
    now = utcnow()
    specs = {
        "train": dict(status=JobStatus.SUCCEEDED, attempts=1, finished=now, result={"final_loss": 0.1}),
        "collect": dict(status=JobStatus.RUNNING, attempts=1, locked_by="worker-test", started=now,
                        locked_until=now + timedelta(minutes=5), progress={"done": 30, "total": 120, "message": "shard 3/12"}),
        "attribute": dict(status=JobStatus.FAILED, attempts=3, finished=now,
                          error='Traceback (most recent call last):\n  File "worker/attribution/engine.py", line 1\n'
                                "RuntimeError: CUDA out of memory <oops> & \"quoted\""),
        "experiment": dict(status=JobStatus.TODO),
        "ablate": dict(status=JobStatus.SUCCEEDED, attempts=1, finished=now, priority=100),
    }
    out = {}
    for kind, kw in specs.items():
        job = Job(kind=kind, payload={"run_id": rid}, run_id=rid, **kw)
        s.add(job)
        s.flush()
        out[kind] = job.id
    return out
