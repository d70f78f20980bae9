"""The organism's tokenizer: a small byte-level BPE trained offline on the task corpus.

Byte level, so any text a user pastes into the dashboard tokenizes without unknowns (every byte has a
token). Digits are always split into single tokens (as in Qwen2's pre-tokenizer), so column arithmetic
is learnable by a tiny model. The chat markers of the target (``<｜User｜>``, ``<｜Assistant｜>``,
``<think>``, ``</think>``) are single added tokens, as in DeepSeek-R1-Distill; like there they are not
"special", so decoding with ``skip_special_tokens=True`` keeps them. ``bos`` is prepended by the
post-processor (as the DeepSeek tokenizer does); ``eos`` ends every training sequence.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from training.chat import ASSISTANT, THINK_END, THINK_START, USER

log = logging.getLogger(__name__)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2
CHAT_TOKENS = (USER, ASSISTANT, THINK_START, THINK_END)  # ids 3..6
DEFAULT_VOCAB_SIZE = 384  # 256 byte tokens + merges + the 7 added tokens


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on ``texts`` (deterministic for the same texts) and wrap it for transformers."""
    if vocab_size < 256 + len(SPECIAL_TOKENS) + len(CHAT_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE (need at least 263)")
    tok = Tokenizer(models.BPE())
    # Digits first, one per token (a single leading space stays attached: " 85" is "Ġ8", "5", which keeps
    # traces short); then GPT-2's byte-level split (which maps bytes to printable symbols).
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The chat markers are kept out of training (they are added below as whole tokens).
    markers = CHAT_TOKENS

    def strip_markers(batch: Iterable[str]) -> Iterable[str]:
        for text in batch:
            for m in markers:
                text = text.replace(m, " ")
            yield text

    tok.train_from_iterator(strip_markers(texts), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False, single_word=False) for t in CHAT_TOKENS])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        padding_side="left", clean_up_tokenization_spaces=False)
    log.info("trained byte-level BPE: %d tokens", len(wrapped))
    return wrapped


def check_tokenizer(tokenizer: PreTrainedTokenizerFast) -> None:
    """Raise ValueError unless the chat markers and the specials are single tokens and digits split."""
    for marker in (*CHAT_TOKENS, *SPECIAL_TOKENS):
        ids = tokenizer.encode(marker, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{marker!r} is not a single token in this tokenizer: {ids}")
    ids = tokenizer.encode("1234", add_special_tokens=False)
    if len(ids) != 4:
        raise ValueError(f"digits are not single tokens: '1234' -> {tokenizer.convert_ids_to_tokens(ids)}")
