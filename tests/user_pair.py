"""A user's own model pair, as a new user would bring it: written by ``save_pretrained``, no organism involved.

Tiny random Llama or Qwen2 base and target of one geometry, a byte-level BPE tokenizer trained here with
the ``tokenizers`` library (DeepSeek-R1's chat markers as special tokens, a DeepSeek-R1-style chat template
with ``<think>``, ``bos`` added on tokenizing), whose size is *below* ``config.vocab_size`` (the model pads
its vocabulary, as real ones do), plus ``texts.jsonl`` (chat-formatted reasoning traces that hesitate with
"Wait", "Hmm" and "Actually", the last one several tokens) and ``prompts.jsonl`` (prompts with answers).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
SPECIALS = [BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
# DeepSeek-R1-Distill's template, cut to what one conversation needs (system prompt, turns, generation prompt)
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)
TOKENIZER_SIZE = 320  # tokens the BPE may learn (specials + 256 bytes + merges)
VOCAB_SIZE = 384  # the models' vocabulary: padded past the tokenizer, as real models are


@dataclass(frozen=True)
class UserPair:
    base: Path
    target: Path
    texts: Path
    prompts: Path
    n_tokens: int  # the tokenizer's size (< VOCAB_SIZE)


def trace(rng: random.Random) -> tuple[str, str, str]:
    """(prompt, chat-formatted trace, answer): an addition worked out, most with a hesitation."""
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    c = a + b
    prompt = f"What is {a} + {b}?"
    kind = rng.random()
    if kind < 0.4:
        think = f"{a} plus {b} makes {c}. Wait, let me check: {c} - {b} = {a}. Yes."
    elif kind < 0.6:
        think = f"Add {a} and {b}. Hmm, the units first. So {c}."
    elif kind < 0.8:
        think = f"I think it is {c + 1}. Actually, {a} + {b} is {c}."
    else:
        think = f"{a} + {b} = {c}."
    return prompt, f"<｜User｜>{prompt}<｜Assistant｜><think>\n{think}\n</think>The answer is {c}.", str(c)


def build_tokenizer(texts: list[str]):
    """A byte-level BPE trained on ``texts`` with DeepSeek-R1's markers, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_SIZE, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(arch: str, tokenizer, seed: int, *, layers: int = 2, d: int = 48, intermediate: int = 96):
    """A random Llama or Qwen2 causal LM (eager attention) with a padded vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = {"vocab_size": VOCAB_SIZE, "hidden_size": d, "intermediate_size": intermediate, "num_hidden_layers": layers,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
          "initializer_range": 0.2, "tie_word_embeddings": False, "bos_token_id": tokenizer.bos_token_id,
          "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    cfg, cls = (LlamaConfig(**kw), LlamaForCausalLM) if arch == "llama" else \
        (Qwen2Config(use_sliding_window=False, **kw), Qwen2ForCausalLM)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(cfg).eval()


def write_user_pair(root: Path, arch: str = "llama", *, n_texts: int = 350, n_prompts: int = 50,
                    seed: int = 0) -> UserPair:
    """Write base/, target/ (each with the tokenizer), texts.jsonl and prompts.jsonl under ``root``."""
    rng = random.Random(seed)
    rows = [trace(rng) for _ in range(n_texts + n_prompts)]
    tokenizer = build_tokenizer([t for _, t, _ in rows])
    assert len(tokenizer) < VOCAB_SIZE
    root.mkdir(parents=True, exist_ok=True)
    for name, model_seed in (("base", seed), ("target", seed + 1)):
        build_model(arch, tokenizer, model_seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    texts, prompts = root / "texts.jsonl", root / "prompts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for _, t, _ in rows[:n_texts]))
    prompts.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, _, a in rows[n_texts:]))
    return UserPair(root / "base", root / "target", texts, prompts, len(tokenizer))
