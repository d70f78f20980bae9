"""Text every backend can store: PostgreSQL's ``text`` and ``jsonb`` refuse the NUL character (U+0000).

A model can produce it (byte-level BPE vocabularies have a token for the byte 0x00, and a small or
ablated model may well generate it), so every token string or decoded text the worker writes goes
through :func:`storable`, which shows NUL as ␀ (U+2400, SYMBOL FOR NULL): the same on SQLite and Postgres,
and visible on a page. Text a user types is refused with a clear message instead (the request validators, :func:`text_problem`):
NUL, and lone surrogates (a JSON ``"\\ud800"`` escape decodes to one; no encoding can store or show it).
"""

from __future__ import annotations

NUL_SHOWN_AS = "\u2400"


def storable(text: str) -> str:
    """``text`` with every NUL replaced by ␀ (the token id next to it keeps the exact value)."""
    return text.replace("\x00", NUL_SHOWN_AS)


def has_nul(text: str) -> bool:
    return "\x00" in text


def has_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate (U+D800–U+DFFF), which UTF-8 cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored as typed (NUL, lone surrogate), or None."""
    if has_nul(text):
        return "contains a NUL character (\\x00); remove it"
    if has_surrogate(text):
        return "contains a lone surrogate (an unpaired \\uD800–\\uDFFF escape), which is not text; remove it"
    return None
