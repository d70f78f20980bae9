"""Small hand-made runs for the labeler tests: features whose evidence says plainly what they do, over the seeded
byte-level tokenizer (tests/seed.py), so a rule or a judge can be checked against what is known."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.db.schema import Example, Feature, Run
from tests.seed import TOK, write_tokenizer

THINK = {"prompt": 2.0, "think-start": 0.0, "thinking": 40.0, "think-end": 0.0, "answer": 1.0}
PROMPT = {"prompt": 40.0, "think-start": 0.0, "thinking": 2.0, "think-end": 0.0, "answer": 0.0}
FLAT = {"edges": [k / 10 for k in range(11)], "counts": [3] * 10}


def ids(*tokens: str) -> list[int]:
    return [TOK[t] for t in tokens]


def _example(run_id: int, layer: int, index: int, kind: str, rank: int, tokens: list[int], focus: int,
             act: float = 2.0) -> Example:
    acts = [0.0] * len(tokens)
    acts[focus] = act
    return Example(run_id=run_id, layer=layer, index=index, kind=kind, rank=rank, token_ids=tokens, acts=acts,
                   focus=focus, max_act=act)


def _feature(s: Session, run_id: int, index: int, *, lens: list[str], regions: dict, examples: list[tuple[list[int], int]],
             n_random: int = 3, frequency: float = 0.01) -> None:
    s.add(Feature(run_id=run_id, layer=0, index=index, frequency=frequency, max_act=2.0 if examples else 0.0,
                  mean_act=1.0, logit_lens={"top": [[TOK[t], t, 3.0 - 0.2 * k] for k, t in enumerate(lens)],
                                            "bottom": []},
                  region_counts=regions, think_pos_hist=FLAT, histogram=None))
    for rank, (tokens, focus) in enumerate(examples):
        s.add(_example(run_id, 0, index, "top", rank, tokens, focus, 3.0 - 0.1 * rank))
    for rank, (tokens, focus) in enumerate(examples[:n_random]):
        s.add(_example(run_id, 0, index, "random", rank, tokens, focus, 0.5))


OTHER_LENS = [" the", " ok", " we", " get", " first"]


def rules_world(engine: Engine, tokenizer_dir: Path) -> int:
    """A run whose layer-0 features are, by index: 0 fires on ' Wait'; 1 fires on the '.' just before ' Wait' after
    a stated answer; 2 promotes ' Wait' / ' Hmm'; 3 fires on digits; 4 fires on '\\n\\n' in the prompt; 5 is dead."""
    write_tokenizer(tokenizer_dir)
    with Session(engine) as s, s.begin():
        run = Run(name="label-rules", base_model="b", target_model="t", config={"tokenizer": str(tokenizer_dir)},
                  n_layers=1, n_features=6, status="collected")
        s.add(run)
        s.flush()
        rid = run.id
        stated = [(ids(" So", "8", "5", ".", " Wait", ",", " check"), 4), (ids(" So", "4", "2", ".", " Wait", " again"), 4),
                  (ids(" answer", " is", "7", ".", " Wait", ","), 4), (ids(" So", "9", ".", " Wait", " let"), 3)]
        _feature(s, rid, 0, lens=OTHER_LENS, regions=THINK, examples=stated)
        _feature(s, rid, 1, lens=OTHER_LENS, regions=THINK, examples=[(t, f - 1) for t, f in stated])
        _feature(s, rid, 2, lens=[" Wait", " Hmm", " the", " ok"], regions=THINK,
                 examples=[(ids("The", " sum", " is", " ok"), 1), (ids(" we", " get", " the", " total"), 2),
                           (ids(" first", " digit", " ok"), 0)])
        _feature(s, rid, 3, lens=OTHER_LENS, regions=THINK,
                 examples=[(ids("4", " +", "3", " =", "7"), 0), (ids("1", "2", " +", "5"), 1), (ids(" =", "9"), 1),
                           (ids("6", " +", "8"), 0)])
        _feature(s, rid, 4, lens=OTHER_LENS, regions=PROMPT,
                 examples=[(ids("The", " sum", "\n\n", "The"), 2), (ids("4", "\n\n", " we"), 1),
                           (ids(" ok", "\n\n"), 1)])
        _feature(s, rid, 5, lens=OTHER_LENS, regions={}, examples=[], frequency=0.0)
    return rid


def judge_world(engine: Engine, tokenizer_dir: Path, n_digit_features: int = 5) -> int:
    """A run whose feature 0 fires on ' Wait' (every example holds it) and features 1… on digits (none holds it)."""
    write_tokenizer(tokenizer_dir)
    with Session(engine) as s, s.begin():
        run = Run(name="label-judge", base_model="b", target_model="t", config={"tokenizer": str(tokenizer_dir)},
                  n_layers=1, n_features=1 + n_digit_features, status="collected")
        s.add(run)
        s.flush()
        rid = run.id
        wait = [(ids(" So", str(d), ".", " Wait", ",", " check"), 3) for d in range(10)] + \
               [(ids(" answer", " is", str(d), " Wait"), 3) for d in range(5)]
        _feature(s, rid, 0, lens=[" Wait", " Hmm"], regions=THINK, examples=wait, n_random=5)
        for i in range(1, 1 + n_digit_features):
            digits = [(ids(str((i + k) % 10), " +", str(k % 10), " =", str((i + 2 * k) % 10)), 0) for k in range(15)]
            _feature(s, rid, i, lens=OTHER_LENS, regions=THINK, examples=digits, n_random=5)
    return rid
