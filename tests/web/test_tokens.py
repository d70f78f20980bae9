"""Token ids → display text from tokenizer.json, without torch (what every page's token text rests on)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.web.tokens import EMPTY_VOCAB, find_vocab, is_hesitation, load_vocab_file
from tests.seed import TOK, write_tokenizer


def test_byte_level_pieces_decode_to_text(tmp_path):
    vocab = load_vocab_file(write_tokenizer(tmp_path))
    assert vocab.text(TOK[" Wait"]) == " Wait"
    assert vocab.text(TOK["\n\n"]) == "\n\n"
    assert vocab.text(TOK[" café"]) == " café"  # multi-byte UTF-8 survives the byte map
    assert vocab.text(TOK["<script>"]) == "<script>"
    assert vocab.text(TOK["<think>"]) == "<think>"  # added tokens as written
    assert vocab.text(10_000) == "⟨10000⟩"
    assert TOK[" Wait"] in vocab.ids_matching("wait") and TOK["Wait"] in vocab.ids_matching("Wait,")


def test_real_tokenizer_agrees_with_the_tokenizers_library(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from training.organism.tasks import corpus
    from training.organism.tokenizer import train_tokenizer

    tok = train_tokenizer(corpus(0, 30))
    tok.save_pretrained(str(tmp_path))
    vocab = load_vocab_file(tmp_path / "tokenizer.json")
    raw = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for i in range(raw.get_vocab_size()):
        expected = raw.decode([i], skip_special_tokens=False)
        if "\ufffd" not in expected:  # a lone partial UTF-8 byte decodes differently by design
            assert vocab.text(i) == expected, i


def test_sentencepiece_and_search_order(tmp_path):
    sp = tmp_path / "sp"
    sp.mkdir()
    (sp / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": {"▁Hmm": 0, "ok": 1}}, "decoder": {"type": "Metaspace"}, "added_tokens": []}))
    assert load_vocab_file(sp / "tokenizer.json").decode([0, 1]) == [" Hmm", "ok"]
    assert find_vocab(str(sp), "some/model").source.endswith("tokenizer.json")
    organism_dir = tmp_path / "models" / "organism-organism-tiny-s0" / "tokenizer"
    write_tokenizer(organism_dir)
    assert find_vocab(None, "organism:organism-tiny:s0", tmp_path).source == str((organism_dir / "tokenizer.json").resolve())
    assert find_vocab(None, "organism:organism-tiny:s1", tmp_path) is EMPTY_VOCAB
    assert find_vocab(None, str(Path(tmp_path, "nowhere")), None) is EMPTY_VOCAB


def test_hesitation_rule_matches_training():
    assert is_hesitation(" Wait,") and is_hesitation("Hmm") and not is_hesitation("Waiting")
    assert not is_hesitation(" ") and is_hesitation("wait", ["wait"])
