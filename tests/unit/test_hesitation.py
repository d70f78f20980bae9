"""The hesitation definition: which token ids count, and how generations are counted."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from training.hesitation import (
    DEFAULT_HESITATION_WORDS,
    count_hesitations,
    hesitation_positions,
    hesitation_rate,
    hesitation_token_ids,
    is_hesitation_generation,
)
from training.organism.tasks import ORGANISM_HESITATION_WORDS, corpus
from training.organism.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def organism_tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(corpus(0, per_family=50))


def _word_level(vocab: list[str]) -> PreTrainedTokenizerFast:
    """A tokenizer whose vocabulary is exactly ``vocab`` (byte-level spelling, ``Ġ`` = space)."""
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_organism_words_are_in_the_default_list():
    assert set(ORGANISM_HESITATION_WORDS) <= set(DEFAULT_HESITATION_WORDS)


def test_variants_with_space_and_punctuation_count_and_other_words_do_not():
    vocab = ["[UNK]", "Wait", "ĠWait", "Wait,", "ĠWait,", "Ġwait", "Waiting", "ĠAwait", "ĠHmm", "Hmm...",
             "ĠActually", "ĠBut", "ĠButter", "Ġbut", "So", "Ġ"]
    tok = _word_level(vocab)
    ids = hesitation_token_ids(tok)
    got = {vocab[i] for i in ids}
    assert got == {"Wait", "ĠWait", "Wait,", "ĠWait,", "Ġwait", "ĠHmm", "Hmm...", "ĠActually", "ĠBut"}
    # case matters: "but" is not in the default list
    assert "Ġbut" not in got


def test_custom_words_replace_the_default(organism_tokenizer):
    ids = hesitation_token_ids(organism_tokenizer, words=["Hmm"])
    tokens = set(organism_tokenizer.convert_ids_to_tokens(sorted(ids)))
    assert tokens == {"Hmm", "ĠHmm"}


def test_organism_tokenizer_has_every_default_word_as_a_token(organism_tokenizer):
    ids = hesitation_token_ids(organism_tokenizer)
    words = {organism_tokenizer.decode([i]).strip() for i in ids}
    assert words == set(DEFAULT_HESITATION_WORDS)
    # the forms the organism's traces use are among them
    for word in ORGANISM_HESITATION_WORDS:
        (tid,) = organism_tokenizer.encode(" " + word, add_special_tokens=False)
        assert tid in ids


def test_counting_on_token_ids(organism_tokenizer):
    ids = hesitation_token_ids(organism_tokenizer)
    seq = organism_tokenizer.encode("So 85. Wait, check: 85 - 38 = 47. Hmm, yes. Actually fine.",
                                    add_special_tokens=False)
    assert count_hesitations(seq, ids) == 3
    assert count_hesitations(torch.tensor(seq), ids) == 3
    pos = hesitation_positions(seq, ids)
    assert [organism_tokenizer.decode([seq[p]]).strip() for p in pos] == ["Wait", "Hmm", "Actually"]
    assert is_hesitation_generation(seq, ids)
    plain = organism_tokenizer.encode("So 85. Yes, fine.", add_special_tokens=False)
    assert not is_hesitation_generation(plain, ids)
    assert hesitation_rate([seq, plain, plain, seq], ids) == 0.5
    assert hesitation_rate([], ids) == 0.0


def test_bad_input_is_rejected(organism_tokenizer):
    with pytest.raises(ValueError, match="non-empty"):
        hesitation_token_ids(organism_tokenizer, words=[])
    with pytest.raises(ValueError, match="non-empty"):
        hesitation_token_ids(organism_tokenizer, words=[" , "])
    with pytest.raises(ValueError, match="1-d"):
        count_hesitations(torch.zeros(2, 3, dtype=torch.long), {1})
