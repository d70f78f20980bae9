"""The two roles of hesitation features (paper's hesitation study), as explicit rules on measured evidence.

The paper finds that "wait" depends on two kinds of adapter features:

- **output** features promote the hesitation token themselves: their logit lens (``W_U (g ⊙ W_dec[:, i])``,
  demeaned; :mod:`worker.collect.lens`) ranks a hesitation token among its top tokens, and they sit next to
  the logit node: much of their influence on the hesitation logit flows through their *direct* edge to it;
- **template** features fire on the formatting tokens that precede hesitations (a line break, a sentence
  end ``.``, the punctuation just after an answer) and reach the logit through other features.

Rules (thresholds in :class:`RoleRules`, defaults chosen on the organism and stated in the report):

1. *recurring*: the feature is a node of at least ``min_graph_fraction`` of the pruned graphs (and at least
   ``min_graphs`` of them); a feature seen in one graph gets no role (``other``).
2. *output*: a hesitation token is among the top ``lens_top_k`` logit-lens tokens (default 1: the token it
   promotes most is a hesitation word; a small vocabulary puts some hesitation word in almost every top 10)
   **and** at least ``min_direct_share`` of its influence on the hesitation logit is its direct edge.
3. *template*: not output, and at least ``min_format_share`` of its influence comes from positions whose
   token is a formatting token (:func:`is_formatting_token`).
4. anything else: ``other``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

OUTPUT, TEMPLATE, OTHER = "output", "template", "other"
ROLES = (OUTPUT, TEMPLATE, OTHER)
FORMAT_PUNCTUATION = frozenset(".,:;!?")  # sentence ends and the punctuation after an answer


@dataclass(frozen=True)
class RoleRules:
    """Thresholds of the classification (module docstring)."""

    min_graph_fraction: float = 0.25  # of the graphs: a node in at least this share of them
    min_graphs: int = 2  # and in at least this many
    lens_top_k: int = 1  # a hesitation token among this many top logit-lens tokens (1: it is the top one)
    min_direct_share: float = 0.3  # share of the feature's influence carried by its direct edge to the logit
    min_format_share: float = 0.5  # share of its influence from positions holding a formatting token

    def __post_init__(self) -> None:
        for name in ("min_graph_fraction", "min_direct_share", "min_format_share"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")
        if self.min_graphs < 1 or self.lens_top_k < 1:
            raise ValueError(f"min_graphs and lens_top_k must be at least 1, got {self.min_graphs}, {self.lens_top_k}")


@dataclass
class FeatureEvidence:
    """What the study measured about one feature (layer, index), summed over its graphs.

    ``influence``: its influence on each graph's hesitation logit as a share of the graph's total feature
    influence, summed over graphs (each graph weighs the same). ``direct``: the part of that carried by its
    direct edge to the hesitation logit. ``format_influence``: the part at positions holding a formatting
    token. ``effect``: its signed linear effect on the hesitation logit (positive: promotes it), as a share of
    each graph's total |effect|, summed. ``n_graphs``: graphs whose pruned version keeps it. ``lens_rank``:
    0-based rank of the best hesitation token among its top logit-lens tokens (None when none is among them or not computed).
    """

    layer: int
    index: int
    influence: float = 0.0
    direct: float = 0.0
    format_influence: float = 0.0
    effect: float = 0.0
    n_graphs: int = 0
    lens_rank: int | None = None
    lens_top: tuple[str, ...] = ()
    role: str = OTHER

    @property
    def key(self) -> tuple[int, int]:
        return self.layer, self.index

    @property
    def direct_share(self) -> float:
        return self.direct / self.influence if self.influence > 0 else 0.0

    @property
    def format_share(self) -> float:
        return self.format_influence / self.influence if self.influence > 0 else 0.0


def is_formatting_token(text: str) -> bool:
    """Whether a decoded token is formatting: whitespace only, a line break, or sentence/answer punctuation.

    ``"\\n"``, ``".\\n"``, ``" ."``, ``","`` are; ``" Wait"``, ``"85"``, ``"So"`` are not.
    """
    if "\n" in text:
        return True
    core = text.strip()
    return core == "" or all(c in FORMAT_PUNCTUATION for c in core)


def is_recurring(ev: FeatureEvidence, n_graphs: int, rules: RoleRules = RoleRules()) -> bool:
    need = max(rules.min_graphs, math.ceil(rules.min_graph_fraction * n_graphs))
    return ev.n_graphs >= need


def classify(ev: FeatureEvidence, n_graphs: int, rules: RoleRules = RoleRules()) -> str:
    """The role of one feature under ``rules`` (module docstring); ``n_graphs``: graphs in the study."""
    if not is_recurring(ev, n_graphs, rules):
        return OTHER
    promotes = ev.lens_rank is not None and ev.lens_rank < rules.lens_top_k
    if promotes and ev.direct_share >= rules.min_direct_share:
        return OUTPUT
    if ev.format_share >= rules.min_format_share:
        return TEMPLATE
    return OTHER


def classify_all(evidence: list[FeatureEvidence], n_graphs: int, rules: RoleRules = RoleRules()) -> dict[str, int]:
    """Set ``role`` on every feature; returns the count per role."""
    counts = dict.fromkeys(ROLES, 0)
    for ev in evidence:
        ev.role = classify(ev, n_graphs, rules)
        counts[ev.role] += 1
    return counts
