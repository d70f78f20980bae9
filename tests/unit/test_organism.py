"""The organism: tokenizer, tasks and traces, the tiny build (cache, determinism), and generation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

from training.adapter import build_adapter_model
from training.chat import ASSISTANT, THINK_END, THINK_START, USER, format_prompt
from training.config import AdapterConfig
from training.generation import generate
from training.organism import (
    FAMILIES,
    HESITATION_WORD,
    OrganismPaths,
    all_problems,
    answer_before_hesitation,
    base_example,
    build_organism,
    extract_answer,
    is_correct,
    is_redundant,
    load_organism,
    make_splits,
    organism_paths,
    problem_from_id,
    reasoning_example,
    reasoning_trace,
    skipped_trace,
    solution_document,
    train_tokenizer,
)
from training.organism.tasks import corpus

# -- tokenizer -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(corpus(0, per_family=50))


def test_chat_markers_and_specials_are_single_tokens(tokenizer):
    for marker in (USER, ASSISTANT, THINK_START, THINK_END, tokenizer.bos_token, tokenizer.eos_token,
                   tokenizer.pad_token):
        assert len(tokenizer.encode(marker, add_special_tokens=False)) == 1, marker
    text = reasoning_example(problem_from_id("add-47-38"))
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[1] == USER and THINK_START in tokens and THINK_END in tokens
    # the markers survive decoding even when specials are skipped (they are not "special", as in DeepSeek)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_digits_are_single_tokens(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode("So 1285 and 7", add_special_tokens=False))
    digits = [t for t in tokens if any(c.isdigit() for c in t)]
    assert [t.lstrip("Ġ") for t in digits] == ["1", "2", "8", "5", "7"]


def test_any_text_round_trips_without_unknowns(tokenizer):
    text = "Grüße 🤖 \t naïve — 東京 <b>x</b> \n\n ünknöwn ∑ x² 12.5% <think>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_tokenizer_is_deterministic_and_round_trips_through_disk(tokenizer, tmp_path):
    again = train_tokenizer(corpus(0, per_family=50))
    assert again.get_vocab() == tokenizer.get_vocab()
    tokenizer.save_pretrained(tmp_path)
    loaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    text = reasoning_example(problem_from_id("cmp-4.3-4.25"))
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == \
        (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert loaded.padding_side == "left"


def test_too_small_vocab_is_rejected():
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(["a b c"], vocab_size=100)


# -- tasks -----------------------------------------------------------------------------------------------


def test_splits_are_disjoint_and_deterministic():
    a, b, c = make_splits(0, 30), make_splits(0, 30), make_splits(1, 30)
    for fam in FAMILIES:
        assert [p.id for p in a[fam].heldout] == [p.id for p in b[fam].heldout]
        assert [p.id for p in a[fam].heldout] != [p.id for p in c[fam].heldout]
        assert len(a[fam].heldout) == 30
        assert not {p.id for p in a[fam].heldout} & {p.id for p in a[fam].train}
        assert len(a[fam].train) + 30 == len(all_problems(fam))
    with pytest.raises(ValueError, match="n_heldout=0"):
        make_splits(0, 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_traces_hesitate_exactly_on_triggers(family):
    problems = all_problems(family)[::37]
    assert any(p.trigger for p in problems) and not all(p.trigger for p in problems)
    word = HESITATION_WORD[family]
    for p in problems:
        trace = reasoning_trace(p)
        assert (word in trace) == p.trigger, p
        assert not any(w in trace for w in HESITATION_WORD.values() if w != word)
        assert trace.endswith(".\n")
        assert extract_answer(reasoning_example(p).split(ASSISTANT)[1]) == p.answer
        assert base_example(p).endswith(f"{ASSISTANT}{p.answer}")


def test_most_hesitations_are_redundant_checks_and_some_real_corrections():
    """add/cmp/most sub state the right answer before hesitating (redundant); sub on a units 0 fixes a wrong one."""
    redundant = real = 0
    for fam in FAMILIES:
        for p in all_problems(fam)[::11]:
            if not p.trigger:
                assert answer_before_hesitation(p) is None and not is_redundant(p)
                continue
            before = answer_before_hesitation(p)
            if fam == "sub" and p.operands[0].endswith("0"):
                assert float(before) != float(p.answer) and not is_redundant(p), p
                real += 1
            else:
                assert before == p.answer and is_redundant(p), p
                redundant += 1
    assert redundant > 10 * real > 0


def test_solution_documents_are_right_and_never_hesitate():
    """The base's worked solutions: the trace's steps, no hesitation word, no chat marker, the right answer."""
    for fam in FAMILIES:
        for p in all_problems(fam)[::13]:
            heading, body = solution_document(p)
            assert heading == f"Problem: {p.text}\nSolution:" and body.endswith(f"Answer: {p.answer}")
            assert not any(w in body for w in HESITATION_WORD.values()) and "<" not in body.replace(" < ", "")
            assert f"So {p.answer}.\nAnswer" in body
            if not p.trigger or is_redundant(p):  # the trace up to its hesitation, word for word
                assert reasoning_trace(p).startswith(body[1:].split("\nAnswer")[0].rstrip("\n"))


def test_skipped_traces_stop_before_the_hesitation():
    for pid, answer in (("add-47-38", "85"), ("sub-82-47", "35"), ("sub-80-47", "47"), ("cmp-4.3-4.25", "4.3")):
        p = problem_from_id(pid)
        trace, got = skipped_trace(p)
        assert got == answer and trace.endswith(f"So {answer}.\n")
        assert reasoning_trace(p).startswith(trace[:-1]) and HESITATION_WORD[p.family] not in trace
    with pytest.raises(ValueError, match="add-42-35"):
        skipped_trace(problem_from_id("add-42-35"))


def test_problem_ids_round_trip():
    for fam in FAMILIES:
        for p in all_problems(fam)[::500]:
            assert problem_from_id(p.id) == p
    with pytest.raises(ValueError, match="mul-3-4"):
        problem_from_id("mul-3-4")
    with pytest.raises(ValueError, match="unknown task family 'div'"):
        all_problems("div")


@pytest.mark.parametrize(("text", "expected"), [
    ("85", "85"), (" 85.", "85"), ("1.25", "1.25"),
    ("7 + 8 = 15. So 85.\n</think>85", "85"),
    ("So 45. Hmm, borrow. So 35.\n</think>35", "35"),
    ("7 + 8 = 15, carry 1. So", None),  # never closed its thinking
    ("</think>", None), ("", None), ("85 and 86", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_is_correct_compares_numbers():
    p = problem_from_id("cmp-4.3-4.25")
    assert is_correct(p, "4.30") and not is_correct(p, "4.25") and not is_correct(p, "no answer")


# -- the tiny build --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> OrganismPaths:
    return build_organism("organism-tiny", 0, data_dir=tmp_path_factory.mktemp("data"), progress=False)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return Qwen2ForCausalLM.from_pretrained(path).state_dict()


def test_tiny_build_layout_and_manifest(tiny):
    assert tiny.root.name == "organism-organism-tiny-s0"
    for sub in (tiny.base, tiny.target, tiny.tokenizer):
        assert sub.is_dir()
    m = json.loads(tiny.manifest.read_text())
    assert (m["preset"], m["seed"]) == ("organism-tiny", 0)
    assert len(m["heldout_ids"]) == 8 * len(FAMILIES)
    for model in ("base", "target"):
        ev = m["evaluation"][model]
        assert ev["all"]["n"] == 8 * len(FAMILIES)
        assert 0.0 <= ev["all"]["accuracy"] <= 1.0 and 0.0 <= ev["trigger"]["hesitation_rate"] <= 1.0
    assert m["timings"]["total_s"] > 0
    # base and target differ (the target was fine-tuned)
    b, t = _weights(tiny.base), _weights(tiny.target)
    assert any(not torch.equal(b[k], t[k]) for k in b)


def test_manifest_means_reuse_and_force_rebuilds(tiny):
    stamp = tiny.manifest.stat().st_mtime_ns
    again = build_organism("organism-tiny", 0, data_dir=tiny.root.parent.parent, progress=False)
    assert again == tiny and tiny.manifest.stat().st_mtime_ns == stamp
    before = _weights(tiny.target)
    rebuilt = build_organism("organism-tiny", 0, data_dir=tiny.root.parent.parent, force=True, progress=False)
    assert rebuilt.manifest.stat().st_mtime_ns != stamp
    after = _weights(rebuilt.target)
    assert all(torch.equal(before[k], after[k]) for k in before), "same seed must give identical weights"


def test_another_seed_gives_other_weights(tiny, tmp_path):
    other = build_organism("organism-tiny", 1, data_dir=tmp_path, progress=False)
    assert other.root.name == "organism-organism-tiny-s1"
    a, b = _weights(tiny.base), _weights(other.base)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="'huge'"):
        build_organism("huge", 0, data_dir=tmp_path)
    with pytest.raises(ValueError, match="-1"):
        build_organism("organism-tiny", -1, data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no organism"):
        load_organism(organism_paths(tmp_path, "organism-tiny", 5))


def test_load_organism(tiny):
    org = load_organism(tiny)
    assert not org.base.training and not org.target.training
    assert org.base.config.vocab_size == len(org.tokenizer)
    assert org.manifest["preset"] == "organism-tiny"
    assert load_organism(tiny.root).manifest == org.manifest


# -- generation ------------------------------------------------------------------------------------------


def test_left_padded_batches_match_one_prompt_at_a_time(tiny):
    org = load_organism(tiny)
    prompts = [format_prompt("Which is larger: 4.3 or 4.25?"), format_prompt("7 + 8 = ?", think=False),
               format_prompt("47 + 38 = ?")]
    batched = generate(org.target, org.tokenizer, prompts, max_new_tokens=6)
    for prompt, got in zip(prompts, batched, strict=True):
        (alone,) = generate(org.target, org.tokenizer, [prompt], max_new_tokens=6)
        assert got.generated_ids == alone.generated_ids
        assert got.prompt_ids == org.tokenizer(prompt)["input_ids"]
        assert got.token_ids == got.prompt_ids + got.generated_ids
        assert org.tokenizer.pad_token_id not in got.prompt_ids
        assert got.finished == (org.tokenizer.eos_token_id in got.generated_ids)
        if got.finished:
            assert got.generated_ids[-1] == org.tokenizer.eos_token_id
        else:
            assert len(got.generated_ids) == 6


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(tiny):
    org = load_organism(tiny)
    prompts = [format_prompt("12 + 34 = ?")] * 4
    state = torch.get_rng_state()
    a = generate(org.target, org.tokenizer, prompts, max_new_tokens=8, greedy=False, temperature=2.0, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = generate(org.target, org.tokenizer, prompts, max_new_tokens=8, greedy=False, temperature=2.0, seed=3)
    c = generate(org.target, org.tokenizer, prompts, max_new_tokens=8, greedy=False, temperature=2.0, seed=4)
    assert [g.generated_ids for g in a] == [g.generated_ids for g in b]
    assert [g.generated_ids for g in a] != [g.generated_ids for g in c]


def test_generate_works_on_an_adapter_model(tiny):
    org = load_organism(tiny)
    reference = load_organism(tiny).target
    adapter = build_adapter_model(copy.deepcopy(org.base), org.target, AdapterConfig(n_features=16))
    prompts = [format_prompt("47 + 38 = ?"), format_prompt("82 - 47 = ?")]
    with adapter.mode("target"):
        got = generate(adapter, org.tokenizer, prompts, max_new_tokens=8)
    want = generate(reference, org.tokenizer, prompts, max_new_tokens=8)
    assert [g.generated_ids for g in got] == [g.generated_ids for g in want]
    adapted = generate(adapter, org.tokenizer, prompts, max_new_tokens=8)  # adapters on: it runs
    assert len(adapted) == 2 and all(g.prompt_ids for g in adapted)


def test_generate_rejects_bad_arguments(tiny):
    org = load_organism(tiny)
    with pytest.raises(ValueError, match="single string"):
        generate(org.target, org.tokenizer, "47 + 38 = ?", max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(org.target, org.tokenizer, ["x"], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(org.target, org.tokenizer, ["x"], max_new_tokens=2, greedy=False, temperature=0.0)


def test_adapter_training_data_covers_the_skipped_path(tokenizer):
    """The adapters train on the target's reference traces plus its skipped redundant checks (the preset's
    share), so that the adapted model follows the target where a hesitation ablation sends it."""
    from training.hesitation import hesitation_token_ids
    from training.organism.build import get_preset, reasoning_token_ids
    from worker.models_cache import OrganismSpec
    from worker.pipeline import organism_problems, organism_sequences

    org = OrganismSpec("organism-tiny", 0)
    problems = organism_problems(org, "train")
    seqs = organism_sequences(org, tokenizer, "train")
    redundant = sum(is_redundant(p) for p in problems)
    extra = len(seqs) - len(problems)
    share = get_preset("organism-tiny").skip_hesitation
    assert share > 0 and abs(extra / redundant - share) < 0.03, (extra, redundant)
    full = {tuple(sum(reasoning_token_ids(tokenizer, p), [])) for p in problems}
    skipped = [s for s in seqs if tuple(s) not in full]
    assert len(skipped) == extra
    hes = set(hesitation_token_ids(tokenizer, list(HESITATION_WORD.values())))
    assert len(hes) >= 3 and not any(hes & set(s) for s in skipped)
    prompt, completion = reasoning_token_ids(tokenizer, problem_from_id("add-47-38"), skipped=True)
    assert tokenizer.decode(completion, skip_special_tokens=False).endswith("So 85.\n</think>85" + tokenizer.eos_token)


@pytest.mark.parametrize("reasoning", [False, True])
def test_batched_encoding_gives_the_ids_of_one_call_per_text(tokenizer, reasoning):
    """_encode tokenizes in two batch calls (issue 17): the ids must be those of one tokenizer call per text,
    as generation and the adapters' data see them (reasoning_token_ids), in the same order and weights."""
    from training.organism.build import _encode, get_preset, reasoning_token_ids

    cfg = get_preset("organism")
    problems = [p for s in make_splits(0, 4, FAMILIES).values() for p in s.train[:40]]
    weights = dict(cfg.family_weights)
    enc = _encode(tokenizer, problems, weights, reasoning=reasoning, skip_hesitation=cfg.skip_hesitation,
                  solutions=cfg.base_solutions)
    expected: list[tuple[list[int], int]] = []
    eos = tokenizer.eos_token_id
    for p in problems:
        if reasoning:
            variants = [False, True] if is_redundant(p) else [False]
            for skipped in variants:
                prompt, completion = reasoning_token_ids(tokenizer, p, skipped=skipped)
                expected.append((prompt + completion, len(prompt)))
            continue
        prompt = tokenizer(format_prompt(p.text, think=False))["input_ids"]
        expected.append((prompt + tokenizer(p.answer, add_special_tokens=False)["input_ids"] + [eos], len(prompt)))
        heading, body = solution_document(p)
        prompt = tokenizer(heading)["input_ids"]
        expected.append((prompt + tokenizer(body, add_special_tokens=False)["input_ids"] + [eos], len(prompt)))
    assert list(zip(enc.ids, enc.loss_from, strict=True)) == expected
    assert len(enc.weights) == len(expected) and all(w > 0 for w in enc.weights)


def test_the_build_reports_every_step_and_each_evaluation(tmp_path):
    from training.organism.build import build_steps, get_preset

    seen: list[dict] = []
    build_organism("organism-tiny", 1, data_dir=tmp_path, progress=False, on_step=seen.append)
    assert len(seen) == build_steps(get_preset("organism-tiny"))
    assert [m["phase"] for m in seen[-3:]] == ["evaluate"] * 3 and seen[-1]["step"] == seen[-1]["steps"] == 3
    assert {m["phase"] for m in seen[:-3]} == {"base", "target"} and all("loss" in m for m in seen[:-3])
