"""explain_api.summary.summarize against drawn tensors, captions, token spans and padding, and
the client's checks of ``detail`` and ``summary_top_k`` before it sends anything."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from explain_api.summary import MAX_TOP_K, concentration_cells, from_proto, summarize, to_proto
from explain_client import ExplainClient
from explain_client.cli import _signed
from explain_client.client import explain_request

pytestmark = pytest.mark.unit

# token texts: words, word pieces, digits, accents, CJK, punctuation, a hyphen, an emoji
PIECES = ["a", "red", "Circ", "le", "2", "naï", "ve", "日", "本", "-", ",", "!", "'s", "🙂", "(", "x1"]


@st.composite
def tokenised(draw):
    """A caption and its token rows as a server reports them: (caption, spans, labels, padding).

    Rows: a start token, the caption's tokens (each touching the one before or after a space;
    some split in two rows with the same span, as byte-level tokens of one character are), an
    end token, then padding rows with the empty span at the end of the last token's."""
    segments = draw(st.lists(st.tuples(st.sampled_from(PIECES), st.booleans(), st.booleans()), max_size=8))
    caption, spans, labels = "", [(0, 0)], ["<start_of_text>"]
    for text, touches, split in segments:
        if caption and not touches:
            caption += " "
        span = (len(caption), len(caption) + len(text))
        caption += text
        spans += [span] * (2 if split else 1)
        labels += [text] * (2 if split else 1)
    end = spans[-1][1]
    spans.append((0, 0))
    labels.append("<end_of_text>")
    n_padding = draw(st.integers(0, 3))
    spans += [(end, end)] * n_padding
    labels += ["!"] * n_padding
    padding = [False] * (len(spans) - n_padding) + [True] * n_padding
    return caption, spans, labels, padding


@st.composite
def explanations(draw):
    caption, spans, labels, padding = draw(tokenised())
    rows, gh, gw = len(spans), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    values = st.one_of(st.just(0.0), st.floats(-1.0, 1.0, width=32), st.sampled_from([0.25, -0.25]))
    grid = draw(arrays(np.float32, (rows, gh, gw), elements=values))
    prefix = draw(arrays(np.float32, (rows, draw(st.integers(0, 2))), elements=values))
    score = draw(st.floats(-1.0, 1.0))
    delta = draw(st.floats(-1e-3, 1e-3))
    top_k = draw(st.integers(0, MAX_TOP_K))
    return grid, prefix, score, delta, caption, spans, labels, padding, top_k


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(explanations())
def test_summaries_keep_their_contract(drawn):
    grid, prefix, score, delta, caption, spans, labels, padding, top_k = drawn
    summary = summarize(grid, prefix, score, delta, caption, spans, labels, padding, top_k)
    gh, gw = grid.shape[1:]
    cells = gh * gw

    assert summary.positive_interaction >= 0.0 >= summary.negative_interaction
    assert summary.positive_interaction + summary.negative_interaction == summary.interaction_total
    magnitude = np.abs(grid).sum(dtype=np.float64) + np.abs(prefix).sum(dtype=np.float64)
    exact = grid.sum(dtype=np.float64) + prefix.sum(dtype=np.float64)
    assert abs(summary.interaction_total - exact) <= 1e-12 * magnitude
    if score - delta == 0.0:
        assert math.isnan(summary.interaction_share)
    else:
        assert summary.interaction_share == summary.interaction_total / (score - delta)

    # the words partition exactly the rows that spell a letter or digit, in caption order
    alphanumeric = [
        row
        for row, ((a, b), pad) in enumerate(zip(spans, padding))
        if not pad and b > a and any(char.isalnum() for char in caption[a:b])
    ]
    assert [row for w in summary.words for row in range(w.first_token, w.end_token)] == alphanumeric
    maps = []
    for word in summary.words:
        rows = range(word.first_token, word.end_token)
        assert word.text == caption[word.start : word.end]
        assert (word.start, word.end) == (min(spans[r][0] for r in rows), max(spans[r][1] for r in rows))
        # a word's rows are one run: each starts where (or before) the one before it ends
        assert all(spans[r][0] <= spans[r - 1][1] for r in rows[1:])
        m = grid[word.first_token : word.end_token].sum(axis=0, dtype=np.float64)
        maps.append(m)
        assert word.relevance == pytest.approx(m.sum(), rel=1e-12, abs=1e-12)
        # the peak is an argmax, the first in row-major order
        assert word.peak_value == m[word.peak_row, word.peak_column] == m.max()
        assert word.peak_row * gw + word.peak_column == int(np.flatnonzero(m == m.max())[0])
        k = concentration_cells(cells)
        assert k == math.ceil(cells / 10)
        if np.all(m == 0.0):
            assert word.concentration == 0.0
        else:
            assert k / cells <= word.concentration <= 1.0
    # neighbouring words never touch: they would be one word
    for before, after in zip(summary.words, summary.words[1:]):
        assert before.end_token <= after.first_token
        assert after.first_token > before.end_token or spans[after.first_token][0] > before.end

    top = summary.top_interactions
    assert len(top) == min(top_k, len(summary.words) * cells)
    magnitudes = [abs(cell.value) for cell in top]
    assert magnitudes == sorted(magnitudes, reverse=True)
    for cell in top:
        assert cell.value == maps[cell.word][cell.row, cell.column]
    if top:
        chosen = {(c.word, c.row, c.column) for c in top}
        rest = [
            abs(m[i, j]) for w, m in enumerate(maps) for i in range(gh) for j in range(gw) if (w, i, j) not in chosen
        ]
        assert max(rest, default=0.0) <= magnitudes[-1]

    assert from_proto(to_proto(summary)) == summary or math.isnan(summary.interaction_share)


def test_a_top_k_of_zero_keeps_the_words_and_no_pairs():
    grid = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    summary = summarize(grid, np.zeros((2, 1)), 1.0, 0.0, "red x", [(0, 3), (4, 5)], ["red", "x"], [False, False], 0)
    assert [w.text for w in summary.words] == ["red", "x"] and summary.top_interactions == ()
    assert (summary.words[1].peak_row, summary.words[1].peak_column) == (2, 3)
    assert summary.words[1].concentration == pytest.approx((23.0 + 22.0) / sum(range(12, 24)))


@pytest.mark.parametrize("cells, k", [(1, 1), (9, 1), (10, 1), (11, 2), (30, 3), (49, 5), (64, 7), (70, 7), (196, 20)])
def test_the_top_ten_percent_is_counted_in_integers(cells, k):
    assert concentration_cells(cells) == k


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"detail": "brief"}, ValueError, "detail must be one of 'full', 'summary'; got 'brief'"),
        ({"detail": 1}, ValueError, "detail must be one of"),
        ({"detail": "summary", "summary_top_k": 101}, ValueError, "summary_top_k must be in [0, 100]; got 101"),
        ({"summary_top_k": -1}, ValueError, "summary_top_k must be in [0, 100]; got -1"),
        ({"summary_top_k": 2.0}, TypeError, "summary_top_k must be an int; got float"),
        ({"summary_top_k": True}, TypeError, "summary_top_k must be an int; got bool"),
    ],
)
def test_the_client_names_a_bad_detail_or_top_k_before_sending(kwargs, error, message):
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        explain_request(image, "a red circle", **kwargs)
    # an unreachable target: these fail before any call
    with ExplainClient("127.0.0.1:1", timeout=5) as client:
        with pytest.raises(error, match="detail|summary_top_k"):
            client.explain(image, "a red circle", **kwargs)
        with pytest.raises(error, match="detail|summary_top_k"):
            client.explain_many([image], ["a red circle"], **kwargs)


def test_the_client_sends_detail_and_top_k():
    request = explain_request(np.zeros((32, 32, 3), dtype=np.uint8), "x", detail="summary", summary_top_k=0)
    assert request.detail == 1 and request.HasField("summary_top_k") and request.summary_top_k == 0
    assert not explain_request(np.zeros((32, 32, 3), dtype=np.uint8), "x").HasField("summary_top_k")


@pytest.mark.parametrize(
    "value, text", [(-1e-9, "+0.000000"), (-0.0, "+0.000000"), (-6e-7, "-0.000001"), (0.25, "+0.250000")]
)
def test_report_values_never_read_minus_zero(value, text):
    assert _signed(value) == text
