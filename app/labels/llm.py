"""The LLM labeler: the paper's auto-interpretation through any OpenAI-compatible chat endpoint (httpx, no SDK).

Per feature, two kinds of request (``POST {url}/chat/completions``, temperature 0):

1. **Description and category**: the top-15 logit-lens tokens and up to 10 top-activating examples, each with
   its activation and the active tokens marked ``<<<tok>>>``; the judge answers JSON
   ``{"description": "<10–15 words>", "category": ..., "subcategory": ...}`` with the paper's categories
   (level 1: language, domain, reasoning, uninterpretable; level 2: the mechanism of a reasoning feature,
   the field of a domain feature).
2. **Detection scoring**, twice: five positives (top-activating examples not shown in step 1 when the store has
   them, else the top five; then five random-sample examples) and five negatives, shuffled and shown unmarked
   with the description; the judge answers the numbers of the excerpts where the feature fires. Accuracy,
   precision and recall per query go to ``details``; the label's ``score`` is the mean accuracy.
   Negatives are other features' examples from the same slice of the layer (the store keeps no text where a
   feature is known silent besides its own windows), so a negative may, rarely, be one where the feature
   fires too: the score is then a slight underestimate.

Requests are rate-limited (``rps``), retried on 429 / 5xx / no answer with exponential backoff (``Retry-After``
honoured), and a labelling resumes: app/labels/run.py skips features this model already labelled, and each
batch is committed on its own.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Sequence
from typing import Any

import httpx

from app.labels import CATEGORIES, SUBCATEGORIES
from app.labels.builtin import Label, piece
from app.labels.evidence import ExampleEvidence, FeatureEvidence
from app.web.tokens import Vocab

log = logging.getLogger(__name__)

DESCRIBE_EXAMPLES = 10
DETECT_POSITIVES = 5
DETECT_NEGATIVES = 5
LENS_TOKENS = 15
WINDOW_BEFORE, WINDOW_AFTER = 24, 6  # tokens of an example shown around its focus

SYSTEM = ("You are an interpretability researcher labelling features of a sparse transcoder adapter trained on a "
          "reasoning language model. Answer with JSON only.")
DESCRIBE = """Describe what this feature does, in 10 to 15 words, and classify it.

Categories (level 1):
- reasoning: behaviour unique to reasoning models: hedging or uncertainty ("Hmm", "Wait", "actually"), \
self-correction or backtracking, metacognitive commentary, verification ("let me check"), think-out-loud verbosity; \
features that promote such tokens count too.
- language: syntax, connectives ("therefore", "so"), punctuation, formatting, chat markers.
- domain: technical terms and setup phrases of a field.
- uninterpretable: no consistent pattern.
Level 2: for reasoning, the mechanism: output (promotes reasoning tokens), input_simple (fires on reasoning tokens), \
input_abstract (fires in reasoning contexts); for domain, the field: math, science or code; otherwise null.

Tokens the feature promotes most (logit lens): {lens}

Top-activating examples (the active tokens are marked <<<like this>>>):
{examples}

Answer: {{"description": "...", "category": "...", "subcategory": ...}}"""
DETECT = """A feature of a language model is described as: "{description}"

Here are {n} text excerpts. In which of them does the feature fire (is active on some token)?

{excerpts}

Answer with the JSON list of the excerpt numbers where it fires, e.g. [1, 4]."""


class LLMError(RuntimeError):
    """The endpoint failed past its retries, or answered something that is not a chat completion."""


class LLMLabeler:
    """Labels features through one chat endpoint and model; ``source`` (the model name) names its labels."""

    def __init__(self, url: str, model: str, *, key: str | None = None, batch_size: int = 8, rps: float = 2.0,
                 retries: int = 5, timeout_s: float = 60.0, backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        if not url or not model:
            raise ValueError("the LLM labeler needs an endpoint URL and a model name (ADAPTERLENS_LABEL_LLM_URL, "
                             "ADAPTERLENS_LABEL_LLM_MODEL, or --llm-url / --llm-model)")
        self.url = url.rstrip("/")
        self.model = model
        self.source = model[:200]
        self.batch_size = batch_size
        self.min_interval = 1.0 / rps
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(timeout=timeout_s, headers=headers, transport=transport)
        self._last = 0.0
        self.requests = 0  # sent, retries included

    @classmethod
    def from_settings(cls, settings: Any) -> LLMLabeler:
        key = settings.label_llm_key.get_secret_value() if settings.label_llm_key is not None else None
        return cls(settings.label_llm_url or "", settings.label_llm_model or "", key=key,
                   batch_size=settings.label_llm_batch, rps=settings.label_llm_rps,
                   retries=settings.label_llm_retries, timeout_s=settings.label_llm_timeout_s)

    def close(self) -> None:
        self.client.close()

    # -- the endpoint -------------------------------------------------------------------------------------

    def _wait_turn(self) -> None:
        now = time.monotonic()
        wait = self._last + self.min_interval - now
        if wait > 0:
            time.sleep(wait)
        self._last = time.monotonic()

    def chat(self, prompt: str, max_tokens: int = 200) -> str:
        """The assistant's answer to one user message (rate-limited, retried)."""
        body = {"model": self.model, "temperature": 0, "max_tokens": max_tokens,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]}
        last_error = ""
        for attempt in range(self.retries + 1):
            self._wait_turn()
            self.requests += 1
            try:
                resp = self.client.post(f"{self.url}/chat/completions", json=body)
            except httpx.TransportError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                retry_after = None
            else:
                if resp.status_code == 200:
                    try:
                        return str(resp.json()["choices"][0]["message"]["content"] or "")
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        raise LLMError(f"not a chat completion: {resp.text[:200]!r}") from exc
                if resp.status_code != 429 and resp.status_code < 500:
                    raise LLMError(f"the endpoint answered {resp.status_code}: {resp.text[:200]!r}")
                last_error = f"HTTP {resp.status_code}"
                retry_after = _retry_after(resp.headers.get("Retry-After"))
            if attempt < self.retries:
                delay = retry_after if retry_after is not None else self.backoff_s * 2 ** attempt
                delay = min(delay, self.max_backoff_s)
                log.info("LLM request failed (%s); retry %d of %d in %.2f s", last_error, attempt + 1, self.retries,
                         delay)
                time.sleep(delay)
        raise LLMError(f"the endpoint failed {self.retries + 1} times; last: {last_error}")

    # -- labelling ----------------------------------------------------------------------------------------

    def label_batch(self, evidence: Sequence[FeatureEvidence], vocab: Vocab,
                    words: Sequence[str] = ()) -> list[tuple[int, int, Label]]:
        """Describe, classify and score each feature of a slice (one layer)."""
        out = []
        for ev in evidence:
            if not ev.top:
                out.append((ev.layer, ev.index, Label("dead: never fired on the collection corpus", "uninterpretable",
                                                      "dead", None, {"rule": "dead"})))
                continue
            others = [e for o in evidence if o.index != ev.index for e in o.top + o.random]
            out.append((ev.layer, ev.index, self.label_feature(ev, vocab, others)))
        return out

    def label_feature(self, ev: FeatureEvidence, vocab: Vocab, negatives_pool: Sequence[ExampleEvidence]) -> Label:
        described = self.describe(ev, vocab)
        description = described["description"]
        rng = random.Random(f"{ev.layer}:{ev.index}")
        top = ev.top
        held_out = top[DESCRIBE_EXAMPLES:DESCRIBE_EXAMPLES + DETECT_POSITIVES]
        queries = [("top", held_out if len(held_out) >= DETECT_POSITIVES else top[:DETECT_POSITIVES])]
        if ev.random:
            queries.append(("random", ev.random[:DETECT_POSITIVES]))
        results = []
        pool = list(negatives_pool)
        rng.shuffle(pool)
        for q, (kind, positives) in enumerate(queries):
            negatives = pool[q * DETECT_NEGATIVES:(q + 1) * DETECT_NEGATIVES]
            if not negatives and not positives:
                continue
            results.append(self.detect(description, positives, negatives, vocab, rng) | {"kind": kind})
        score = sum(r["accuracy"] for r in results) / len(results) if results else None
        return Label(description, described["category"], described["subcategory"],
                     round(score, 4) if score is not None else None,
                     {"judge": self.model, "detection": results, "raw": described.get("raw")})

    def describe(self, ev: FeatureEvidence, vocab: Vocab) -> dict[str, Any]:
        answer = self.chat(describe_prompt(ev, vocab))
        data = _json_object(answer)
        description = str(data.get("description") or answer).strip().replace("\n", " ")[:300] or "(no description)"
        category = str(data.get("category") or "").strip().lower()
        category = category if category in CATEGORIES else "uninterpretable"
        sub = data.get("subcategory")
        sub = str(sub).strip().lower() if isinstance(sub, str) else None
        sub = sub if sub in SUBCATEGORIES.get(category, ()) else None
        return {"description": description, "category": category, "subcategory": sub, "raw": answer[:500]}

    def detect(self, description: str, positives: Sequence[ExampleEvidence], negatives: Sequence[ExampleEvidence],
               vocab: Vocab, rng: random.Random) -> dict[str, Any]:
        items = [(True, e) for e in positives] + [(False, e) for e in negatives]
        rng.shuffle(items)
        excerpts = "\n".join(f"{n}. {example_text(e, vocab, marked=False)}" for n, (_, e) in enumerate(items, 1))
        answer = self.chat(DETECT.format(description=description, n=len(items), excerpts=excerpts), max_tokens=60)
        picked = {n for n in _json_numbers(answer) if 1 <= n <= len(items)}
        truth = {n for n, (pos, _) in enumerate(items, 1) if pos}
        tp = len(picked & truth)
        fp = len(picked - truth)
        fn = len(truth - picked)
        tn = len(items) - tp - fp - fn
        return {"accuracy": (tp + tn) / len(items), "precision": tp / (tp + fp) if tp + fp else 0.0,
                "recall": tp / (tp + fn) if tp + fn else 0.0, "picked": sorted(picked), "positives": sorted(truth)}


# -- prompts ----------------------------------------------------------------------------------------------

def _visible(text: str) -> str:
    return text.replace("\n", "\\n")


def example_text(ex: ExampleEvidence, vocab: Vocab, *, marked: bool = True) -> str:
    """An example's window around its focus; with ``marked``, active tokens as ``<<<tok>>>``."""
    lo, hi = max(0, ex.focus - WINDOW_BEFORE), min(len(ex.token_ids), ex.focus + WINDOW_AFTER + 1)
    parts = []
    for i in range(lo, hi):
        text = _visible(piece(vocab, ex.token_ids[i])[0])
        active = i < len(ex.acts) and isinstance(ex.acts[i], int | float) and ex.acts[i] > 0
        parts.append(f"<<<{text}>>>" if marked and active else text)
    return "".join(parts)


def _focus_act(ex: ExampleEvidence) -> float:
    value = ex.acts[ex.focus] if ex.focus < len(ex.acts) else None
    return float(value) if isinstance(value, int | float) else ex.max_act


def describe_prompt(ev: FeatureEvidence, vocab: Vocab) -> str:
    lens = ", ".join(repr(piece(vocab, tid)[0]) for tid, _ in ev.logit_top[:LENS_TOKENS]) or "(none stored)"
    examples = "\n".join(f"{n}. (activation {_focus_act(ex):.3g}) {example_text(ex, vocab)}"
                         for n, ex in enumerate(ev.top[:DESCRIBE_EXAMPLES], 1))
    return DESCRIBE.format(lens=lens, examples=examples)


def _json_object(text: str) -> dict[str, Any]:
    match = re.search(r"\{.*\}", text, re.S)
    if match:
        try:
            value = json.loads(match.group(0))
            return value if isinstance(value, dict) else {}
        except ValueError:
            pass
    return {}


def _json_numbers(text: str) -> list[int]:
    match = re.search(r"\[[^\]]*\]", text)
    if match:
        try:
            value = json.loads(match.group(0))
            if isinstance(value, list):
                return [int(v) for v in value if isinstance(v, int | float) and not isinstance(v, bool)]
        except ValueError:
            pass
    return [int(n) for n in re.findall(r"\d+", text)]


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
