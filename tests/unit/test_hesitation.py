"""The hesitation definition: which token ids count, and how generations are counted."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from training.hesitation import (
    DEFAULT_HESITATION_WORDS,
    HesitationCounter,
    count_hesitations,
    count_in_text,
    find_occurrences,
    first_token_ids,
    hesitation_positions,
    hesitation_rate,
    hesitation_token_ids,
    is_hesitation_generation,
    normalize_words,
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
    with pytest.raises(ValueError, match="at least one"):
        hesitation_token_ids(organism_tokenizer, words=[])
    with pytest.raises(ValueError, match="no letters"):
        hesitation_token_ids(organism_tokenizer, words=[" , "])
    with pytest.raises(ValueError, match="1-d"):
        count_hesitations(torch.zeros(2, 3, dtype=torch.long), {1})


def test_occurrences_are_words_in_the_decoded_text():
    text = "So 85. Wait, check. Waiting is not one; (Hmm) is. Awaited no. But yes, Butter no. wait2 no."
    assert [w for _, _, w in find_occurrences(text)] == ["Wait", "Hmm", "But"]
    assert count_in_text("Actually, actually", ["Actually"]) == 1  # case-sensitive
    assert normalize_words(" Wait, Hmm ") == ("Wait", "Hmm")
    assert normalize_words(None) == DEFAULT_HESITATION_WORDS


def test_a_word_spelled_by_several_tokens_counts_once_and_is_placed_at_its_first_token():
    pieces = {1: "So", 2: " Act", 3: "ually", 4: ",", 5: " fine", 6: " Wait", 7: "ing"}
    counter = HesitationCounter(pieces.__getitem__, ["Actually", "Wait"])
    seq = [1, 2, 3, 4, 5, 6, 7]
    assert counter.count(seq) == 1  # " Actually"; " Waiting" is not "Wait"
    assert counter.positions(seq) == [1]
    assert counter.marks(seq) == [False, True, True, False, False, False, False]
    assert counter.per_word(seq) == {"Actually": 1}
    assert counter.rate([seq, [1, 5]]) == 0.5


def test_counter_on_a_real_tokenizer_agrees_with_the_single_token_ids(organism_tokenizer):
    counter = HesitationCounter.for_tokenizer(organism_tokenizer)
    ids = hesitation_token_ids(organism_tokenizer)
    seq = organism_tokenizer.encode("So 85. Wait, check: 85 - 38 = 47. Hmm, yes. Actually fine.",
                                    add_special_tokens=False)
    assert counter.count(seq) == count_hesitations(seq, ids) == 3
    assert counter.positions(seq) == hesitation_positions(seq, ids)
    firsts = first_token_ids(organism_tokenizer, ["Wait"])["Wait"]
    assert firsts and firsts <= ids
