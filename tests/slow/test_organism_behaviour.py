"""The full organism behaves as the hesitation study needs (minutes: ``pytest -m slow``).

The organism is the one the slow tier's demo run built (tests/slow/conftest.py).
"""

from __future__ import annotations

import pytest

from training.organism import FAMILIES, build_organism, evaluate_organism, load_organism, problem_from_id

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def organism(demo):
    """The demo run's organism (built by its pipeline; the build is cached by its manifest)."""
    return load_organism(build_organism("organism", 0, data_dir=demo["settings"].data_dir, progress=False))


def test_base_answers_directly_and_never_hesitates(organism):
    ev = organism.manifest["evaluation"]["base"]
    # 90.0% with bf16 products on this machine, 98.7% in fp32 (README, The organism): the base answers; how
    # well is not what the adapters are measured on
    assert ev["all"]["accuracy"] >= 0.85, ev
    assert ev["all"]["hesitation_rate"] == 0.0
    assert ev["all"]["mean_tokens"] <= 6  # the answer digits and eos
    assert organism.manifest["evaluation"]["base_on_think_prompts"]["all"]["hesitation_rate"] <= 0.01


def test_target_hesitates_on_triggers_only_and_answers_right(organism):
    ev = organism.manifest["evaluation"]["target"]
    assert ev["trigger"]["hesitation_rate"] >= 0.95, ev["trigger"]
    assert ev["non_trigger"]["hesitation_rate"] < 0.02, ev["non_trigger"]
    assert ev["all"]["accuracy"] >= 0.9, ev["all"]
    for fam in FAMILIES:
        assert ev[fam]["trigger"]["hesitation_rate"] >= 0.9, (fam, ev[fam])
        assert ev[fam]["trigger"]["mean_tokens"] > ev[fam]["non_trigger"]["mean_tokens"]


def test_saved_models_reproduce_the_manifest(organism):
    """Greedy decoding of the loaded target gives the manifest's numbers again (weights saved faithfully)."""
    problems = [problem_from_id(i) for i in organism.manifest["heldout_ids"]]
    again = evaluate_organism(organism.target, organism.tokenizer, problems, think=True,
                              max_new_tokens=organism.manifest["config"]["eval_max_new_tokens"])
    assert again == organism.manifest["evaluation"]["target"]
