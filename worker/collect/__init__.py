"""Feature collection: per-feature dashboard statistics from one streaming pass, shardable, stored in the DB.

``collect(model, corpus, …) -> CollectionResult``; ``merge_results(*shard_results)``;
``write_collection(session_or_engine, run_id, result, tokenizer)``.
"""

from worker.collect.corpus import Corpus, Markers, load_corpus
from worker.collect.result import CollectionResult, ExampleWindow, merge_results
from worker.collect.runner import collect
from worker.collect.stats import FeatureStats, merge
from worker.collect.store import write_collection

__all__ = [
    "CollectionResult",
    "Corpus",
    "ExampleWindow",
    "FeatureStats",
    "Markers",
    "collect",
    "load_corpus",
    "merge",
    "merge_results",
    "write_collection",
]
