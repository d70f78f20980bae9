"""The package boundaries of design.md, checked on the source: app/web and app/db import nothing from worker/.

The web process must not depend on code it never runs (and the web image carries no torch), so the queue's
named queries and the request validation live in app/db, which both sides import. app/cli.py, the
composition root that starts workers, is the one place in app/ allowed to import worker/.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_web_and_store_import_nothing_from_worker():
    offenders = {}
    for folder in ("app/web", "app/db"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            bad = sorted(m for m in _imported_modules(path) if m == "worker" or m.startswith("worker."))
            if bad:
                offenders[str(path.relative_to(ROOT))] = bad
    assert not offenders, f"app/web and app/db must not import worker/: {offenders}"


def test_store_and_web_import_only_torch_free_training_modules():
    """app/ may use training/'s torch-free modules (chat format, hesitation definition, configs, JSONL, answer
    scoring, thread settings), never torch itself."""
    torch_free = {"training.chat", "training.hesitation", "training.config", "training.jsonl", "training.answers",
                  "training.threads"}
    offenders = {}
    for path in sorted((ROOT / "app").rglob("*.py")):
        if path.name == "cli.py":
            continue
        mods = _imported_modules(path)
        bad = sorted(m for m in mods if m in ("torch", "transformers") or m.startswith(("torch.", "transformers."))
                     or (m.startswith("training") and m not in torch_free))
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert not offenders, f"app/ imports torch-side modules: {offenders}"
