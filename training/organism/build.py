"""Build the model organism: a tiny base model and its hesitating "reasoning" fine-tune, in minutes on a CPU.

Phases (timed, logged, recorded in the manifest):

0. Tokenizer: byte-level BPE trained on a sample of the task texts (:mod:`.tokenizer`).
1. Base: a small Qwen2 trained from scratch to answer directly (loss on the answer only), and on plain-text
   worked solutions without hesitations (loss on the solution), as a math base model meets them in pretraining.
2. Target: the base fine-tuned on ``<think>`` traces whose hesitations are tied to problem features
   (loss on everything the assistant writes).
3. Evaluation: greedy generations on the held-out problems: accuracy and hesitation rates.

Output, under ``<data_dir>/models/organism-<preset>-s<seed>/``: ``base/``, ``target/`` (``save_pretrained``),
``tokenizer/`` and ``organism.json``. A directory with a manifest is reused unless ``force``.
Same preset and seed on the same machine give identical weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from training.chat import THINK_END, format_prompt
from training.config import Precision
from training.generation import generate
from training.hesitation import DEFAULT_HESITATION_WORDS, HesitationCounter
from training.organism.tasks import (
    FAMILIES,
    HESITATION_WORD,
    Problem,
    corpus,
    is_correct,
    is_redundant,
    make_splits,
    reasoning_trace,
    skipped_trace,
    solution_document,
)
from training.organism.tokenizer import check_tokenizer, train_tokenizer
from training.precision import fp32_attention, resolve_precision

log = logging.getLogger(__name__)

MANIFEST = "organism.json"


@dataclass(frozen=True)
class OrganismPreset:
    """Model shape, training schedule and evaluation size of one organism preset."""

    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_positions: int = 512  # room for text pasted into the lens; RoPE has no learned positions
    vocab_size: int = 384  # upper bound for the BPE; the trained tokenizer may be smaller
    batch_size: int = 128  # sequences per step
    micro_batches: int = 4  # per step, grouped by length (less padding; same gradient)
    base_steps: int = 700  # half the draws are solution documents; why 700: README, First feature page sooner
    base_lr: float = 3e-3
    base_solutions: float = 0.5  # share of base draws that are worked-solution documents (see _encode)
    target_steps: int = 500
    target_lr: float = 1e-3
    skip_hesitation: float = 0.2  # share of redundant-check draws trained without their hesitation (see _encode)
    warmup_steps: int = 50
    family_weights: tuple[tuple[str, float], ...] = (("add", 0.40), ("sub", 0.35), ("cmp", 0.25))
    n_heldout: int = 200  # per family
    train_per_family: int | None = None  # None = every problem not held out
    eval_max_new_tokens: int = 96  # traces are at most ~62 tokens
    # the training forward's matrix products: "auto" = bfloat16 where the CPU has it natively, else fp32
    # (training/precision.py; the manifest says which ran)
    precision: Precision = "auto"


PRESETS: dict[str, OrganismPreset] = {
    "organism": OrganismPreset(),
    # seconds, for the fast tests: the behaviour need not emerge
    "organism-tiny": OrganismPreset(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                                    num_kv_heads=1, batch_size=16, micro_batches=2, base_steps=6, target_steps=6,
                                    warmup_steps=2, n_heldout=8, train_per_family=64,
                                    eval_max_new_tokens=24),
}


def get_preset(name: str) -> OrganismPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown organism preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class OrganismPaths:
    """Where one built organism lives."""

    root: Path
    base: Path
    target: Path
    tokenizer: Path
    manifest: Path

    @classmethod
    def under(cls, root: Path) -> OrganismPaths:
        root = Path(root)
        return cls(root, root / "base", root / "target", root / "tokenizer", root / MANIFEST)

    def exists(self) -> bool:
        return self.manifest.is_file()

    def read_manifest(self) -> dict:
        return json.loads(self.manifest.read_text())


def organism_paths(data_dir: Path, preset: str = "organism", seed: int = 0) -> OrganismPaths:
    """The directory of an organism inside the data directory (whether built or not)."""
    get_preset(preset)
    return OrganismPaths.under(Path(data_dir) / "models" / f"organism-{preset}-s{seed}")


def _spread(items: list, n: int | None) -> list:
    """``n`` items evenly spaced through ``items`` (all of them for None)."""
    if n is None or n >= len(items):
        return items
    return items[::len(items) // n][:n]


# -- data ------------------------------------------------------------------------------------------------

@dataclass
class _Encoded:
    """Token ids of training sequences, and from which index on the loss counts."""

    ids: list[list[int]] = field(default_factory=list)
    loss_from: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # sampling weight per sequence


def reasoning_token_ids(tokenizer: PreTrainedTokenizerFast, problem: Problem,
                        skipped: bool = False) -> tuple[list[int], list[int]]:
    """A problem's reference reasoning example as the target was trained on it: the chat prompt's ids
    (with bos) and the completion's (trace, ``</think>``, answer, eos), tokenized separately as generation
    sees them. ``skipped``: the trace cut before its hesitation (:func:`skipped_trace`)."""
    prompt_ids = tokenizer(format_prompt(problem.text))["input_ids"]
    trace, answer = skipped_trace(problem) if skipped else (reasoning_trace(problem), problem.answer)
    completion = tokenizer(trace + THINK_END + answer, add_special_tokens=False)["input_ids"]
    return list(prompt_ids), list(completion) + [tokenizer.eos_token_id]


def _encode(tokenizer: PreTrainedTokenizerFast, problems: Sequence[Problem], weights: dict[str, float],
            reasoning: bool, skip_hesitation: float = 0.0, solutions: float = 0.0) -> _Encoded:
    """Prompt and completion are tokenized separately, as generation will see them: prompt, then new tokens.

    Base (``reasoning=False``): a direct answer, and with ``solutions`` > 0 that share of draws a plain-text
    worked solution (:func:`solution_document`; loss on the solution). Target: the ``<think>`` trace; with
    ``skip_hesitation`` > 0 a redundant check is drawn that often with its trace cut before the hesitation
    (:func:`skipped_trace`), so that going on without it is the model's second choice (greedy decoding
    still hesitates); a real correction is never skipped.

    The texts are tokenized in batches (one call for the prompts, one for the completions): the same ids as
    one call per text (:func:`reasoning_token_ids`; a test checks it), in about a third of the time for the organism's
    ~86k texts (the Rust tokenizer's batch call, without transformers' per-text wrapping).
    """
    counts = {f: sum(p.family == f for p in problems) for f in weights}
    items: list[tuple[str, str, float, str]] = []  # prompt (with bos), completion (eos appended), share, family
    for p in problems:
        if reasoning:  # tokenized exactly as the adapters' training data and the study's references are
            skip = skip_hesitation if skip_hesitation > 0 and is_redundant(p) else 0.0
            trace = reasoning_trace(p)
            items.append((format_prompt(p.text), trace + THINK_END + p.answer, 1.0 - skip, p.family))
            if skip:
                trace, answer = skipped_trace(p)
                items.append((format_prompt(p.text), trace + THINK_END + answer, skip, p.family))
            continue
        items.append((format_prompt(p.text, think=False), p.answer, 1.0 - solutions, p.family))
        if solutions > 0:
            heading, body = solution_document(p)
            items.append((heading, body, solutions, p.family))
    enc = _Encoded()
    if not items:
        return enc
    eos = tokenizer.eos_token_id
    backend = tokenizer.backend_tokenizer  # the Rust tokenizer: its batch call, without transformers' wrapping
    prompts = [e.ids for e in backend.encode_batch([it[0] for it in items], add_special_tokens=True)]
    completions = [e.ids for e in backend.encode_batch([it[1] for it in items], add_special_tokens=False)]
    for (_, _, share, family), prompt_ids, completion_ids in zip(items, prompts, completions, strict=True):
        enc.ids.append(list(prompt_ids) + list(completion_ids) + [eos])
        enc.loss_from.append(len(prompt_ids))
        enc.weights.append(share * weights[family] / counts[family])
    return enc


def _batch(enc: _Encoded, rows: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels (-100 outside the completion)."""
    width = max(len(enc.ids[r]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        seq = torch.tensor(enc.ids[r])
        ids[i, :len(seq)] = seq
        mask[i, :len(seq)] = 1
        labels[i, enc.loss_from[r]:len(seq)] = seq[enc.loss_from[r]:]
    return ids, mask, labels


@contextlib.contextmanager
def _bf16_forward(model: Qwen2ForCausalLM, enabled: bool):
    """Within the block, the yielded callable runs ``model``'s forward with its linear layers in bfloat16
    (autocast; the weights, their gradients and AdamW's state stay fp32) and its attention in fp32
    (training/precision.py says why). Only the forward is autocast: with the backward and the optimizer inside
    it too, the organism's loss stalled near its start (5.7 after 150 steps against 0.5 in fp32)."""
    if not enabled:
        yield model
        return

    def forward(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(*args, **kwargs)

    with fp32_attention(model):
        yield forward


def _lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(total - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _train(model: Qwen2ForCausalLM, enc: _Encoded, *, steps: int, lr: float, preset: OrganismPreset, seed: int,
           pad_id: int, desc: str, progress: bool, on_step: Callable[[dict], None] | None,
           bf16: bool = False) -> list[float]:
    """Plain AdamW loop on sampled batches (``bf16``: see :func:`_bf16_forward`); returns the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.tensor(enc.weights, dtype=torch.double)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    with _bf16_forward(model, bf16) as forward:
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, lr, preset.warmup_steps, steps)
            rows = torch.multinomial(weights, preset.batch_size, replacement=True, generator=gen).tolist()
            # Sorted by length and cut into micro-batches, each padded only to its own longest row; the summed
            # token loss over the whole batch gives the same gradient as one big padded batch, with less padding.
            rows.sort(key=lambda r: (len(enc.ids[r]), r))
            m = preset.micro_batches
            micro = [rows[j * len(rows) // m:(j + 1) * len(rows) // m] for j in range(m)]
            n_tokens = sum(len(enc.ids[r]) - enc.loss_from[r] for r in rows)
            total = 0.0
            for chunk in micro:
                ids, mask, labels = _batch(enc, chunk, pad_id)
                logits = forward(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                       ignore_index=-100, reduction="sum") / n_tokens
                loss.backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # early steps on a fresh model spike
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(total)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if on_step is not None:
                on_step({"phase": desc, "step": step + 1, "steps": steps, "loss": losses[-1]})
    model.eval()
    return losses


def _model_config(preset: OrganismPreset, tokenizer: PreTrainedTokenizerFast) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=preset.hidden_size, intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers, num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads, max_position_embeddings=preset.max_positions,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


# -- evaluation ------------------------------------------------------------------------------------------

def evaluate_organism(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, problems: Sequence[Problem], *,
                      think: bool, max_new_tokens: int, words: Sequence[str] = DEFAULT_HESITATION_WORDS) -> dict:
    """Greedy generations on ``problems``: accuracy and hesitation rates, overall, per family and by trigger."""
    counter = HesitationCounter.for_tokenizer(tokenizer, words)
    gens = generate(model, tokenizer, [format_prompt(p.text, think=think) for p in problems],
                    max_new_tokens=max_new_tokens)
    rows = [(p, is_correct(p, g.text), counter.hesitates(g.generated_ids), len(g.generated_ids))
            for p, g in zip(problems, gens, strict=True)]

    def summary(sel: list) -> dict:
        n = len(sel)
        return {"n": n,
                "accuracy": sum(r[1] for r in sel) / n if n else None,
                "hesitation_rate": sum(r[2] for r in sel) / n if n else None,
                "mean_tokens": sum(r[3] for r in sel) / n if n else None}

    out = {"all": summary(rows),
           "trigger": summary([r for r in rows if r[0].trigger]),
           "non_trigger": summary([r for r in rows if not r[0].trigger])}
    for fam in FAMILIES:
        sel = [r for r in rows if r[0].family == fam]
        out[fam] = {**summary(sel), "trigger": summary([r for r in sel if r[0].trigger]),
                    "non_trigger": summary([r for r in sel if not r[0].trigger])}
    return out


# -- the build -------------------------------------------------------------------------------------------

EVALUATIONS = 3  # generation runs of the build's phase 3 (base direct, base on <think> prompts, target)


def build_steps(cfg: OrganismPreset) -> int:
    """The units of a build's progress (``on_step`` calls): every training step of both models, then one per
    evaluation run."""
    return cfg.base_steps + cfg.target_steps + EVALUATIONS


def build_organism(preset: str = "organism", seed: int = 0, *, data_dir: Path, force: bool = False,
                   progress: bool = True, on_step: Callable[[dict], None] | None = None) -> OrganismPaths:
    """Build (or reuse) the base/target pair of ``preset`` with ``seed``; returns where it lives.

    ``on_step`` receives ``{"phase", "step", "steps", ...}`` :func:`build_steps` times: after each training
    step (with its ``loss``) and after each evaluation run (phase ``evaluate``)."""
    cfg = get_preset(preset)
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    paths = organism_paths(data_dir, preset, seed)
    if paths.exists() and not force:
        log.info("reusing organism at %s", paths.root)
        return paths
    tmp = paths.root.with_name(f"{paths.root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    out = OrganismPaths.under(tmp)
    timings: dict[str, float] = {}  # seconds, wall clock and this process's CPU time
    t_all, c_all = time.perf_counter(), time.process_time()

    t, c = time.perf_counter(), time.process_time()  # Phase 0: tokenizer
    tokenizer = train_tokenizer(corpus(seed), vocab_size=cfg.vocab_size)
    check_tokenizer(tokenizer)
    splits = make_splits(seed, cfg.n_heldout, FAMILIES)
    train = [p for s in splits.values() for p in _spread(s.train, cfg.train_per_family)]
    heldout = [p for s in splits.values() for p in s.heldout]
    weights = dict(cfg.family_weights)
    bf16 = resolve_precision(cfg.precision) == "bf16"
    timings["tokenizer_s"], timings["tokenizer_cpu_s"] = time.perf_counter() - t, time.process_time() - c

    t, c = time.perf_counter(), time.process_time()  # Phase 1: base, direct answers
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(_model_config(cfg, tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("organism %s seed %d: %.2f M parameters, %d training problems", preset, seed, n_params / 1e6, len(train))
    base_data = _encode(tokenizer, train, weights, reasoning=False, solutions=cfg.base_solutions)
    base_losses = _train(model, base_data, steps=cfg.base_steps,
                         lr=cfg.base_lr, preset=cfg, seed=seed, pad_id=tokenizer.pad_token_id, desc="base",
                         progress=progress, on_step=on_step, bf16=bf16)
    model.save_pretrained(out.base)
    timings["base_s"], timings["base_cpu_s"] = time.perf_counter() - t, time.process_time() - c

    t, c = time.perf_counter(), time.process_time()  # Phase 2: target, fine-tuned from the base on hesitating traces
    traces = _encode(tokenizer, train, weights, reasoning=True, skip_hesitation=cfg.skip_hesitation)
    target_losses = _train(model, traces, steps=cfg.target_steps, lr=cfg.target_lr, preset=cfg, seed=seed + 1,
                           pad_id=tokenizer.pad_token_id, desc="target", progress=progress, on_step=on_step,
                           bf16=bf16)
    model.save_pretrained(out.target)
    tokenizer.save_pretrained(out.tokenizer)
    timings["target_s"], timings["target_cpu_s"] = time.perf_counter() - t, time.process_time() - c

    t, c = time.perf_counter(), time.process_time()  # Phase 3: evaluation on held-out problems
    base = Qwen2ForCausalLM.from_pretrained(out.base)
    runs = {"base": (base, False, 8), "base_on_think_prompts": (base, True, cfg.eval_max_new_tokens),
            "target": (model, True, cfg.eval_max_new_tokens)}
    evaluation = {}
    for i, (name, (m, think, max_new)) in enumerate(runs.items()):
        evaluation[name] = evaluate_organism(m, tokenizer, heldout, think=think, max_new_tokens=max_new)
        if on_step is not None:  # the job's progress goes on through the evaluation (build_steps counts it)
            on_step({"phase": "evaluate", "step": i + 1, "steps": len(runs), "what": name})
    timings["eval_s"], timings["eval_cpu_s"] = time.perf_counter() - t, time.process_time() - c
    timings["total_s"], timings["total_cpu_s"] = time.perf_counter() - t_all, time.process_time() - c_all

    manifest = {
        "preset": preset, "seed": seed, "config": asdict(cfg), "n_params": n_params,
        "vocab_size": len(tokenizer), "hesitation_words": dict(HESITATION_WORD),
        "evaluation": evaluation, "timings": timings,
        "final_loss": {"base": base_losses[-1], "target": target_losses[-1]},
        "heldout_ids": [p.id for p in heldout],
        "precision": "bf16" if bf16 else "fp32",
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "threads": torch.get_num_threads(), "machine": platform.machine()},
    }
    out.manifest.write_text(json.dumps(manifest, indent=1))
    if paths.root.exists():
        shutil.rmtree(paths.root)
    paths.root.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(paths.root)
    log.info("organism built in %.0f s: base accuracy %.3f, target accuracy %.3f, target hesitation %.3f "
             "(trigger %.3f, other %.3f)", timings["total_s"], evaluation["base"]["all"]["accuracy"],
             evaluation["target"]["all"]["accuracy"], evaluation["target"]["all"]["hesitation_rate"],
             evaluation["target"]["trigger"]["hesitation_rate"], evaluation["target"]["non_trigger"]["hesitation_rate"])
    return paths


@dataclass
class Organism:
    """A loaded organism: both models (eval mode), the tokenizer and the manifest."""

    base: Qwen2ForCausalLM
    target: Qwen2ForCausalLM
    tokenizer: PreTrainedTokenizerFast
    manifest: dict
    paths: OrganismPaths


def load_organism(paths: OrganismPaths | Path, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> Organism:
    """Load a built organism (``OrganismPaths`` or its directory)."""
    if not isinstance(paths, OrganismPaths):
        paths = OrganismPaths.under(Path(paths))
    if not paths.exists():
        raise FileNotFoundError(f"no organism at {paths.root} (missing {MANIFEST}); build it with build_organism")
    kw = {"dtype": dtype} if dtype is not None else {}
    base = Qwen2ForCausalLM.from_pretrained(paths.base, **kw).to(device).eval()
    target = Qwen2ForCausalLM.from_pretrained(paths.target, **kw).to(device).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(paths.tokenizer)
    return Organism(base, target, tokenizer, paths.read_manifest(), paths)
