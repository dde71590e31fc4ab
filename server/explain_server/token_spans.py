"""Readable token labels and their character spans in the caption as the user wrote it.

A tokenizer sees a *cleaned* caption (open_clip's cleaning repairs mojibake, decodes HTML
entities, collapses whitespace, lower-cases, and for SigLIP deletes punctuation), and a byte-level
tokenizer may split one character's UTF-8 bytes over several tokens, none of which decodes alone.
This module maps each token back to the characters of the caption as given:

- the cleaned text is aligned to the caption character by character (:func:`align`), tolerant of
  every rewrite the cleaning does: case, compatibility forms (NFKD), entities, deletions;
- tokens that share a character, one of them a fragment of it, are joined: each gets the span and
  the label of the characters they cover together, so no label is U+FFFD;
- characters that the cleaning deleted (punctuation, invisible format characters) belong to the
  token before them (the first token when they lead), so that the spans of the caption's tokens
  cover every character that is not whitespace.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

# How far apart (in normalised characters, both texts together) the alignment looks for the next
# pair of equal characters after a mismatch before it falls back to a one-sided search.
_WINDOW = 8
BLANK_LABEL = "\u2581"
"""The label of a token that stands for whitespace only (sentencepiece's word-boundary mark)."""


@dataclass(frozen=True)
class Piece:
    """One content token as a tokenizer produced it.

    Attributes:
        token_id: its id.
        start, end: the characters of the cleaned caption it stands for; a token that holds part
            of a character's bytes covers that whole character.
        label: its readable text, or None when it is a fragment of a character (not valid UTF-8
            alone); "" when it stands for whitespace only.
    """

    token_id: int
    start: int
    end: int
    label: str | None


def _keys(text: str) -> tuple[list[str], list[int]]:
    """Comparable characters of ``text`` (NFKD, case-folded, whitespace dropped), each with the index it came from."""
    keys, owners = [], []
    for i, char in enumerate(text):
        if char.isspace():
            continue
        for key in unicodedata.normalize("NFKD", char).casefold():
            keys.append(key)
            owners.append(i)
    return keys, owners


def _resync(a: list[str], i: int, b: list[str], j: int) -> tuple[int, int]:
    """The nearest (i', j') at or after (i, j) where a[i'] == b[j']; (i, j + 1) when b[j] never occurs again."""
    for distance in range(1, _WINDOW + 1):
        for skip_a in range(distance + 1):
            ia, jb = i + skip_a, j + distance - skip_a
            if ia < len(a) and jb < len(b) and a[ia] == b[jb]:
                return ia, jb
    try:  # deleted runs longer than the window (e.g. punctuation that SigLIP's cleaning drops)
        return a.index(b[j], i), j
    except ValueError:  # b[j] was inserted by the cleaning
        return i, j + 1


def align(original: str, cleaned: str) -> list[tuple[int, int]]:
    """The characters of ``original`` each character of ``cleaned`` came from.

    Greedy, monotone and linear in practice: equal characters are paired in order, skipping
    what differs. A cleaned character that pairs with nothing (a space, an uncurled quote) gets the
    original characters between its paired neighbours.

    Returns:
        One (start, end) per character of ``cleaned``, offsets into ``original``, non-decreasing.
    """
    a, a_owner = _keys(original)
    b, b_owner = _keys(cleaned)
    first: list[int | None] = [None] * len(cleaned)
    last: list[int | None] = [None] * len(cleaned)
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] != b[j]:
            i, j = _resync(a, i, b, j)
            continue
        c, o = b_owner[j], a_owner[i]
        first[c] = o if first[c] is None else min(first[c], o)
        last[c] = o + 1 if last[c] is None else max(last[c], o + 1)
        i, j = i + 1, j + 1
    spans = [(0, 0)] * len(cleaned)
    before = 0  # end of the last paired character so far
    for c in range(len(cleaned)):
        if first[c] is not None:  # pairs are in order, so these spans never go backwards
            spans[c] = (first[c], last[c])
            before = max(before, last[c])
        else:
            spans[c] = (before, before)
    after = len(original)  # start of the next paired character, walking backwards
    for c in reversed(range(len(cleaned))):
        if first[c] is not None:
            after = spans[c][0]
        else:
            spans[c] = (min(spans[c][0], after), after)
    return spans


def readable(original: str, cleaned: str, pieces: list[Piece]) -> tuple[list[str], list[tuple[int, int]]]:
    """Labels and spans in ``original`` of the content tokens ``pieces`` of ``cleaned``.

    Args:
        original: the caption as given.
        cleaned: the text the tokenizer read, after its cleaning.
        pieces: the caption's content tokens in order (no special tokens).

    Returns:
        (labels, spans), one each per piece. Labels are never U+FFFD unless the caption holds
        one; a fragment's label is the text of the characters it shares with its neighbours;
        whitespace tokens are labelled :data:`BLANK_LABEL` with an empty span where they stand.
    """
    if not pieces:
        return [], []
    char_spans = align(original, cleaned)

    def to_original(start: int, end: int) -> tuple[int, int]:
        if start >= end:
            at = char_spans[start][0] if start < len(char_spans) else len(original)
            return at, at
        return char_spans[start][0], max(s[1] for s in char_spans[start:end])

    # join fragments with the tokens they share a character with
    groups: list[list[int]] = [[0]]
    for k in range(1, len(pieces)):
        prev, cur = pieces[groups[-1][-1]], pieces[k]
        shares = cur.start < max(pieces[m].end for m in groups[-1])
        if shares and (prev.label is None or cur.label is None):
            groups[-1].append(k)
        else:
            groups.append([k])
    labels: list[str] = [""] * len(pieces)
    spans: list[tuple[int, int]] = [(0, 0)] * len(pieces)
    for group in groups:
        if len(group) == 1 and pieces[group[0]].label is not None:
            piece = pieces[group[0]]
            if piece.label.strip():
                labels[group[0]], spans[group[0]] = piece.label, to_original(piece.start, piece.end)
            else:
                labels[group[0]], spans[group[0]] = BLANK_LABEL, to_original(piece.start, piece.start)
            continue
        start = min(pieces[k].start for k in group)
        end = max(pieces[k].end for k in group)
        text = cleaned[start:end].strip() or BLANK_LABEL
        for k in group:
            labels[k], spans[k] = text, to_original(start, end)
    _absorb_deleted(original, labels, spans)
    return labels, spans


def _absorb_deleted(original: str, labels: list[str], spans: list[tuple[int, int]]) -> None:
    """Extend spans over the caption's non-whitespace characters that no token covers (in place).

    Such a character belongs to the nearest token before it, else to the first token; tokens
    sharing that token's span (joined fragments) are extended with it.
    """
    owners = [k for k, label in enumerate(labels) if label != BLANK_LABEL and spans[k][0] < spans[k][1]]
    if not owners:
        owners = list(range(len(labels)))
    covered = [False] * len(original)
    for start, end in spans:
        for c in range(start, end):
            covered[c] = True
    for c, char in enumerate(original):
        if covered[c] or char.isspace():
            continue
        before = [k for k in owners if spans[k][1] <= c]
        owner = max(before, key=lambda k: (spans[k][1], k)) if before else owners[0]
        old = spans[owner]
        new = (min(old[0], c), max(old[1], c + 1))
        for k in range(len(spans)):
            if spans[k] == old and (k == owner or labels[k] == labels[owner]):
                spans[k] = new
        for c2 in range(new[0], new[1]):
            covered[c2] = True
