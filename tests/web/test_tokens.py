"""The vocabulary module: token ids → display text through the ``tokenizers`` library (no torch)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from app.web.tokens import EMPTY_VOCAB, find_vocab, is_hesitation, load_vocab_file
from tests.seed import TOK, write_tokenizer


def test_byte_level_pieces_decode_to_text(tmp_path):
    vocab = load_vocab_file(write_tokenizer(tmp_path))
    assert vocab.text(TOK[" Wait"]) == " Wait"
    assert vocab.text(TOK["\n\n"]) == "\n\n"
    assert vocab.text(TOK[" café"]) == " café"  # multi-byte UTF-8 survives the byte map
    assert vocab.text(TOK["<script>"]) == "<script>"
    assert TOK[" Wait"] in vocab.ids_matching("wait") and TOK["Wait"] in vocab.ids_matching("Wait,")


def test_special_tokens_are_readable_and_padded_ids_are_not_tokens(tmp_path):
    vocab = load_vocab_file(write_tokenizer(tmp_path))
    user = vocab.token(TOK["<｜User｜>"])
    assert (user.kind, user.text, user.exact) == ("special", "<|User|>", "<｜User｜>")  # no full-width glyphs
    assert vocab.token(TOK["<think>"]).kind == "special"
    pad = vocab.token(vocab.size + 7)
    assert pad.kind == "padding" and not vocab.is_token(vocab.size + 7) and vocab.is_token(TOK[" Wait"])
    assert vocab.ids_matching(f"#{vocab.size + 7}") == [] and vocab.ids_matching(f"#{TOK[' Wait']}") == [TOK[" Wait"]]


def test_partial_utf8_bytes_show_as_bytes(tmp_path):
    """A byte-level token holding half of 'é' reads as its byte, not as U+FFFD."""
    b2u = {b: c for c, b in __import__("app.web.tokens", fromlist=["_BYTE_OF_CHAR"])._BYTE_OF_CHAR.items()}
    half = b2u[0xC3]
    tok = Tokenizer(models.BPE({"a": 0, half: 1, "b": 2}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(tmp_path / "tokenizer.json"))
    t = load_vocab_file(tmp_path / "tokenizer.json").token(1)
    assert (t.kind, t.text) == ("bytes", "<0xC3>")


def test_real_tokenizer_agrees_with_the_tokenizers_library(tmp_path):
    from training.organism.tasks import corpus
    from training.organism.tokenizer import train_tokenizer

    tok = train_tokenizer(corpus(0, 30))
    tok.save_pretrained(str(tmp_path))
    vocab = load_vocab_file(tmp_path / "tokenizer.json")
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for i in range(raw.get_vocab_size()):
        t = vocab.token(i)
        if t.kind == "text":
            assert t.text == raw.decode([i], skip_special_tokens=False), i


def test_sentencepiece_keeps_leading_spaces_and_search_order(tmp_path):
    sp = tmp_path / "sp"
    sp.mkdir()
    tok = Tokenizer(models.BPE({"a": 0, "▁Hmm": 1, "ok": 2, "<0xE2>": 3}, merges=[], byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_tokens([AddedToken("<s>", special=True)])
    tok.save(str(sp / "tokenizer.json"))
    vocab = load_vocab_file(sp / "tokenizer.json")
    assert vocab.decode([1, 2]) == [" Hmm", "ok"]  # the leading space survives the decoder's strip
    assert vocab.token(3).kind == "bytes" and vocab.token(3).text == "<0xE2>"  # ByteFallback
    assert find_vocab(str(sp), "some/model").source.endswith("tokenizer.json")
    organism_dir = tmp_path / "models" / "organism-organism-tiny-s0" / "tokenizer"
    write_tokenizer(organism_dir)
    assert find_vocab(None, "organism:organism-tiny:s0", tmp_path).source == str((organism_dir / "tokenizer.json").resolve())
    assert find_vocab(None, "organism:organism-tiny:s1", tmp_path) is EMPTY_VOCAB
    assert find_vocab(None, str(Path(tmp_path, "nowhere")), None) is EMPTY_VOCAB


def test_hesitation_marks_follow_the_training_rule(tmp_path):
    vocab = load_vocab_file(write_tokenizer(tmp_path))
    ids = [TOK[" So"], TOK[" Wait"], TOK[","], TOK[" check"], TOK["."], TOK["Wait"], TOK[" sum"], TOK[" check"],
           TOK["Wait"]]
    # " Wait," and ".Wait sum" hold the word; "checkWait" does not (a letter right before it)
    assert vocab.hesitation_marks(ids) == [False, True, False, False, False, True, False, False, False]
    assert is_hesitation(" Wait,") and is_hesitation("Hmm") and not is_hesitation("Waiting")
    assert not is_hesitation(" ") and is_hesitation("wait", ["wait"])


@pytest.mark.parametrize("missing", [None, "nowhere/model"])
def test_no_tokenizer_shows_ids(missing):
    assert find_vocab(None, missing, None) is EMPTY_VOCAB
    assert EMPTY_VOCAB.text(5) == "⟨5⟩"


def test_token_spans_escape_every_text_and_mark_the_window():
    """The feature page's token markup (built in Python for speed): texts escaped as autoescape would, the
    next token's text in data-next, ``…`` where the shown window is cut, classes from the token's state."""
    from types import SimpleNamespace

    from markupsafe import escape

    from app.web.templating import token_spans

    ex = SimpleNamespace(tokens=["a", "<b>", "\"&'", "\n", "z"], acts=[0.0, 2.0, 4.0, 0.0, 0.0], focus=2,
                         window=(1, 4), token_kinds=["text", "text", "text", "text", "special"],
                         hesitation=[False, True, False, False, False])
    html = str(token_spans(ex, 4.0))
    assert html == (
        '<span class="tok out" data-act="0" data-next="&lt;b&gt;">a</span>'
        '<span class="ell">…</span>'
        '<span class="tok on hes" style="--a:0.500" data-act="2" data-next="&#34;&amp;&#39;">&lt;b&gt;</span>'
        '<span class="tok focus on" style="--a:1.000" data-act="4" data-next="↵">&#34;&amp;&#39;</span>'
        '<span class="tok nl" data-act="0" data-next="z">↵</span>'
        '<span class="ell">…</span>'
        '<span class="tok out special" data-act="0" data-next="(end of the example)">z</span>')
    assert str(escape("\"&'")) == "&#34;&amp;&#39;"  # what autoescape writes


def test_token_search_index_gives_what_a_pass_over_the_vocabulary_gives(tmp_path):
    vocab = load_vocab_file(write_tokenizer(tmp_path))
    strip = " \t\n\r,.;:!?…—-\"'()"
    for query in ("Wait", " wait", "WAIT.", "<think>", "", "no-such-token", "#3"):
        q = query.strip()
        if q.startswith("#"):
            continue
        key = q.strip(strip).casefold() or q.casefold()
        expected = []
        for i in vocab.all_ids():
            t = vocab.token(i)
            text = t.text if t.kind == "special" else t.exact
            if t.kind != "padding" and (text.strip(strip).casefold() or text.casefold()) == key:
                expected.append(i)
        assert vocab.ids_matching(query) == expected, query
        assert vocab.ids_matching(query, limit=1) == expected[:1]
    assert vocab.ids_matching("#3") == [3]
    assert len(vocab.ids_matching("wait")) >= 2 and vocab.ids_matching("<think>")  # the cases are not all empty


def test_top_token_is_the_first_lens_entry_that_is_a_token(tmp_path):
    """The index's top token: the first logit-lens entry the vocabulary shows (padded ids skipped), the same as
    the feature page's first lens row; without a tokenizer the stored text."""
    from app.web.data.feature import _lens, top_token

    vocab = load_vocab_file(write_tokenizer(tmp_path))
    padded = max(vocab.all_ids()) + 5  # an id of a padded vocabulary: not a token
    lens = {"top": [[padded, "pad", 9.0], [3, "x", 2.0], [4, "y", 1.0]], "bottom": []}
    assert top_token(lens, vocab) == vocab.token(3).text == _lens(lens["top"], vocab)[0].text
    assert top_token({"top": [[padded, "pad", 1.0]]}, vocab) is None
    assert top_token(lens) == "pad" and top_token(None) is None and top_token({"top": "bad"}) is None
