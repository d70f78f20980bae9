"""The model organism: a tiny base model and a hesitating reasoning fine-tune, built offline in minutes.

The embedded default model pair (no weights need downloading). See :mod:`.tasks` for the problems and
traces, :mod:`.tokenizer` for the byte-level BPE, :mod:`.build` for training, caching and loading.
"""

from training.organism.build import (
    PRESETS,
    Organism,
    OrganismPaths,
    OrganismPreset,
    build_organism,
    evaluate_organism,
    get_preset,
    load_organism,
    organism_paths,
)
from training.organism.tasks import (
    FAMILIES,
    HESITATION_WORD,
    ORGANISM_HESITATION_WORDS,
    Problem,
    all_problems,
    answer_before_hesitation,
    base_example,
    extract_answer,
    is_correct,
    is_redundant,
    make_splits,
    problem_from_id,
    reasoning_example,
    reasoning_trace,
    skipped_trace,
    solution_document,
)
from training.organism.tokenizer import train_tokenizer

__all__ = [
    "FAMILIES", "HESITATION_WORD", "ORGANISM_HESITATION_WORDS", "PRESETS", "Organism", "OrganismPaths",
    "OrganismPreset", "Problem", "all_problems", "answer_before_hesitation", "base_example", "build_organism",
    "evaluate_organism", "extract_answer", "get_preset", "is_correct", "is_redundant", "load_organism",
    "make_splits", "organism_paths", "problem_from_id", "reasoning_example", "reasoning_trace", "skipped_trace",
    "solution_document", "train_tokenizer",
]
