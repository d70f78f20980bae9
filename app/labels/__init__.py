"""Feature labels and categories: the built-in rules, an LLM judge, their storage and full-text search.

Torch-free (the web process imports the search and the category shares): a labeler reads only what the
collect job stored for a feature (its top and random examples, its logit lens, where it fires) and writes
``feature_labels`` rows (app/db/schema.py ``FeatureLabel``), one per feature and labeler (``source``).

- :mod:`app.labels.evidence`: a feature's stored evidence, read in slices.
- :mod:`app.labels.builtin`: deterministic rules (no model, no network).
- :mod:`app.labels.llm`: the paper's description prompt and detection scoring through an OpenAI-compatible
  chat endpoint.
- :mod:`app.labels.store`: writing labels, the search filter, category shares.
- :mod:`app.labels.run`: labelling a run (what the ``label`` job and ``adapterlens label`` do).
"""

CATEGORIES = ("reasoning", "domain", "language", "uninterpretable")
"""The paper's level-1 categories."""

SUBCATEGORIES = {
    "reasoning": ("output", "input_simple", "input_abstract"),
    "domain": ("math", "science", "code"),
    "language": ("connective", "formatting", "lexical"),
    "uninterpretable": ("mixed", "dead"),
}
"""Level 2: the paper's for reasoning (mechanism) and domain (field); the built-in rules' own for the rest."""

BUILTIN = "builtin"
"""The ``source`` of the built-in rules' labels; an LLM's labels carry its model name."""
