"""What a user's run reads (worker.run_data): a held-out split it never trains on, prompts cut from its texts."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from app.db.schema import Run
from tests.user_pair import build_tokenizer, trace
from training.chat import ChatFormat
from training.data import heldout_indices
from worker.run_data import (
    heldout_sequences,
    prompts_from_texts,
    run_chat_format,
    run_prompts,
    text_split,
    training_data,
)


def _run(path: Path, **data) -> Run:
    return Run(name="mine", base_model="/b", target_model="/t",
               config={"data": {"kind": "jsonl", "path": str(path), **data}, "train": {}})


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    rows = [trace(random.Random(i)) for i in range(50)]
    path = tmp_path_factory.mktemp("texts") / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for _, t, _ in rows))
    return path, [t for _, t, _ in rows]


@pytest.fixture(scope="module")
def tokenizer(texts):
    return build_tokenizer(texts[1])


def test_heldout_split_is_seeded_disjoint_and_bounded() -> None:
    a = heldout_indices(350, fraction=0.1, max_n=500, seed=0)
    assert a == heldout_indices(350, fraction=0.1, max_n=500, seed=0) and len(a) == 35 and a == sorted(set(a))
    assert a != heldout_indices(350, fraction=0.1, max_n=500, seed=1)
    assert len(heldout_indices(50_000, fraction=0.1, max_n=500)) == 500
    assert heldout_indices(1, fraction=0.5) == [] and heldout_indices(10, fraction=0.0) == []
    assert len(heldout_indices(3, fraction=0.9)) == 2  # at least one text is left to train on
    with pytest.raises(ValueError, match="fraction"):
        heldout_indices(10, fraction=1.0)


def test_the_run_never_trains_on_its_heldout_texts(texts, tokenizer) -> None:
    path, all_texts = texts
    run = _run(path, heldout={"fraction": 0.2, "max": 500, "seed": 0})
    split = text_split(run)
    assert len(split.heldout) == 10 and len(split.train) == 40 and not split.overlaps_training
    assert set(split.train).isdisjoint(split.heldout) and sorted(split.train + split.heldout) == sorted(all_texts)
    assert "10 of the 50 texts of texts.jsonl" in split.description
    data = training_data(run, tokenizer, None)
    assert len(data) == 40
    seqs, where = heldout_sequences(run, tokenizer, n=4, max_len=12)
    assert len(seqs) == 4 and max(map(len, seqs)) <= 12 and where.endswith("first 4 used")
    assert seqs[0] == tokenizer(split.heldout[0])["input_ids"][:12]


def test_eval_file_and_runs_from_before_the_split(texts, tokenizer, tmp_path: Path) -> None:
    path, all_texts = texts
    other = tmp_path / "heldout.jsonl"
    other.write_text(json.dumps({"text": "<｜User｜>x<｜Assistant｜><think>\ny</think>z"}) + "\n")
    split = text_split(_run(path, eval_path=str(other)))
    assert split.train == all_texts and len(split.heldout) == 1 and "heldout.jsonl" in split.description
    old = text_split(_run(path))  # no "heldout" key: the run trained on every text
    assert old.overlaps_training and old.train == all_texts and "trained on them too" in old.description


def test_prompts_are_cut_from_texts_after_the_generation_prompt(texts, tokenizer) -> None:
    path, all_texts = texts
    chat = ChatFormat()
    prompts = prompts_from_texts(all_texts[:3] + ["no chat markers here"], chat)
    assert len(prompts) == 3 and all(p.endswith("<｜Assistant｜><think>\n") and all_texts[i].startswith(p)
                                     for i, p in enumerate(prompts))
    run = _run(path, heldout={"fraction": 0.2, "seed": 0})
    assert run_chat_format(run, tokenizer).source == "tokenizer chat template"
    ps = run_prompts(run, tokenizer)
    assert len(ps.texts) == 10 and ps.answers == [None] * 10 and "held-out texts" in ps.description
    assert len(run_prompts(run, tokenizer, split="all").texts) == 50
    odd = Run(name="odd", base_model="/b", target_model="/t",
              config={"data": {"kind": "jsonl", "path": str(path)}, "chat": {"template": "Q: {prompt}\nA:"}})
    with pytest.raises(ValueError, match="give --prompts"):
        run_prompts(odd, tokenizer)
    imported = Run(name="imp", base_model="/ckpt", target_model="/ckpt", config={"imported": {"format": "reference"}})
    with pytest.raises(ValueError, match="give a prompts file"):
        run_prompts(imported, tokenizer)


def test_prompt_files_are_formatted_with_the_run_chat_format(texts, tokenizer, tmp_path: Path) -> None:
    path, _ = texts
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 2 + 2?", "answer": 4}) + "\n" + json.dumps({"prompt": "Hi"}) + "\n")
    run = _run(path, prompts_path=str(prompts))
    run.config["chat"] = {"template": "Q: {prompt}\nA:", "source": "given"}
    ps = run_prompts(run, tokenizer)
    assert ps.texts == ["Q: What is 2 + 2?\nA:", "Q: Hi\nA:"] and ps.answers == ["4", None]
    assert ps.score("The answer is 4.", "4") is True
