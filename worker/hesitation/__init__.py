"""The hesitation study and the attribution jobs (``attribute``, ``hesitation``).

:mod:`.study` finds hesitation sites, builds and aggregates graphs and chooses the feature set;
:mod:`.roles` classifies features into the paper's output and template roles; :mod:`.store` writes
graphs and feature sets idempotently; :mod:`.job` holds the handlers.
"""
