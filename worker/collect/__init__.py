"""Feature collection: per-feature dashboard statistics from one streaming pass, shardable, stored in the DB.

Typical use (a ``collect`` job, or its shards)::

    corpus = load_corpus("data/corpus.jsonl", tokenizer)        # or Corpus.from_sequences(ids, markers=…)
    result = collect(model, corpus, shard=(i, n))               # FeatureStats per layer + lens + neighbours
    result.save(f"shard-{i}.pt")                                # … then, in the merge job:
    merged = merge_results(*(CollectionResult.load(p) for p in paths))
    write_collection(engine, run_id, merged, tokenizer, corpus=corpus)  # replaces the run's features and examples;
                                                                # with the corpus, examples link to their sequences

Modules: ``stats`` (device accumulators and ``merge``), ``corpus`` (sources), ``lens`` (logit lens and
decoder neighbours), ``runner`` (the pass), ``result`` (the result object), ``store`` (DB writes).
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
