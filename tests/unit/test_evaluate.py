"""The evaluation's held-out rows equal a direct computation, and its generation rows use the one hesitation
definition and answer scorer."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import randomize_adapters
from tests.user_pair import build_model, build_tokenizer, trace
from training.adapter import build_adapter_model
from training.answers import score
from training.config import AdapterConfig
from training.evaluate import evaluate, format_table
from training.hesitation import HesitationCounter


@pytest.fixture(scope="module")
def pair():
    rows = [trace(random.Random(i)) for i in range(40)]
    tokenizer = build_tokenizer([t for _, t, _ in rows])
    base, target = build_model("llama", tokenizer, 0), build_model("llama", tokenizer, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the encoder init draws from the global RNG
        model = randomize_adapters(build_adapter_model(build_model("llama", tokenizer, 0), target,
                                                       AdapterConfig(n_features=24)), seed=1, scale=0.5)
    return model.eval(), base, tokenizer, rows


@torch.no_grad()
def _direct(model, base, texts: list[list[int]]) -> dict[str, float]:
    """Mean over every position of every text of KL(p_target ‖ p_model), each text alone (no padding)."""
    total = dict.fromkeys(("base", "hybrid", "adapted"), 0.0)
    n = 0
    for ids in texts:
        x = torch.tensor([ids])
        with model.mode("target"):
            t = F.log_softmax(model(input_ids=x).logits.double(), -1)
        with model.mode("hybrid"):
            outs = {"hybrid": model(input_ids=x).logits}
        outs["adapted"] = model(input_ids=x).logits
        outs["base"] = base(input_ids=x).logits
        for name, logits in outs.items():
            total[name] += float((t.exp() * (t - F.log_softmax(logits.double(), -1))).sum())
        n += len(ids)
    return {k: v / n for k, v in total.items()}


def test_heldout_kl_equals_a_direct_computation(pair) -> None:
    model, base, tokenizer, rows = pair
    texts = [tokenizer(t)["input_ids"] for _, t, _ in rows[:9]]  # different lengths: batches are padded
    result = evaluate(model, base, tokenizer, [], heldout=texts, batch_size=4, data={"texts": "nine texts"})
    want = _direct(model, base, texts)
    for name in ("base", "hybrid", "adapted"):
        assert result.models[name].kl_to_target == pytest.approx(want[name], rel=1e-4, abs=1e-6)
    assert result.models["target"].kl_to_target == pytest.approx(0.0, abs=1e-6)
    assert result.kl_gap_closed == pytest.approx(1 - want["adapted"] / want["hybrid"], rel=1e-4)
    assert result.n_texts == 9 and result.n_tokens == sum(map(len, texts))
    assert result.n_prompts == 0 and result.models["adapted"].hesitation_rate is None
    assert len(result.l0_per_layer) == model.n_layers and result.l0_mean > 0
    assert "nine texts" in format_table(result)
    alone = evaluate(model, None, tokenizer, [], heldout=texts, max_batch_tokens=30)  # every text its own batch
    assert alone.models["adapted"].kl_to_target == pytest.approx(want["adapted"], rel=1e-4, abs=1e-6)
    assert "base" not in alone.models


def test_token_batches_bound_padded_tokens() -> None:
    from training.evaluate import token_batches

    batches = token_batches([5, 50, 10, 10, 3], batch_size=3, max_batch_tokens=30)
    assert batches == [[1], [2, 3, 0], [4]]
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]


def test_generation_rows_count_words_and_score_answers(pair) -> None:
    model, base, tokenizer, rows = pair
    prompts = [f"<｜User｜>{p}<｜Assistant｜><think>\n" for p, _, _ in rows[:6]]
    answers = [a for _, _, a in rows[:6]]
    heldout = [tokenizer(t)["input_ids"] for _, t, _ in rows[6:10]]
    words = ["Wait", "Actually", "the"]
    result = evaluate(model, base, tokenizer, prompts, answers, heldout=heldout, score_answer=score,
                      max_new_tokens=12, hesitation_words=words)
    from training.generation import generate

    counter = HesitationCounter.for_tokenizer(tokenizer, words)
    with model.mode("target"):
        gens = generate(model, tokenizer, prompts, max_new_tokens=12)
    flags = [counter.hesitates(g.generated_ids) for g in gens]
    target = result.models["target"]
    assert target.hesitation_rate == pytest.approx(sum(flags) / len(flags))
    per_word: dict[str, float] = {}
    for g in gens:
        for w, k in counter.per_word(g.generated_ids).items():
            per_word[w] = per_word.get(w, 0.0) + k / len(gens)
    assert target.hesitations_per_word == pytest.approx(per_word)
    assert target.accuracy == pytest.approx(sum(score(g.text, a) for g, a in zip(gens, answers, strict=True)) / 6)
    assert result.n_scored == 6 and result.hesitation_words == words
    assert target.kl_on_generations == pytest.approx(0.0, abs=1e-6)
    assert result.models["adapted"].kl_on_generations is not None
    assert max(t for g in gens for t in g.generated_ids) < len(tokenizer)  # padded ids are never generated
