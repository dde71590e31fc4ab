"""Caption tokenizers of every kind open_clip uses: sequences, references, readable labels and spans."""

from __future__ import annotations

import open_clip
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from open_clip.tokenizer import HFTokenizer
from tiny_hf import register_tiny_hf_clip, save_tokenizer

from explain_server.inputs import InputError, tokenize
from explain_server.token_spans import align
from explain_server.tokenizers import TokenizerLoadError, caption_tokenizer, load_tokenizer

pytestmark = pytest.mark.unit

# tokenizer kind -> open_clip HFTokenizer options of the models that use it
KINDS = {
    "byte_bpe": {},  # roberta-ViT-B-32
    "unigram": {},  # xlm-roberta-*
    "nllb": {},  # nllb-clip-*
    "siglip": {"clean": "canonicalize"},  # ViT-*-SigLIP
    "byte_fallback_bpe": {"clean": "canonicalize"},  # ViT-*-SigLIP2 (Gemma)
    "wordpiece": {"strip_sep_token": True},  # ViT-*-CLIPA
}
CONTEXT = 32


@pytest.fixture(scope="module")
def hf_tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        kind: HFTokenizer(str(save_tokenizer(root / kind, kind)), context_length=CONTEXT, **options)
        for kind, options in KINDS.items()
    }


@pytest.fixture(scope="module")
def all_tokenizers(hf_tokenizers):
    return {"clip": open_clip.get_tokenizer("ViT-B-32"), **hf_tokenizers}


WORDS = [
    "a",
    "cat",
    "Photo",
    "صورة",
    "قطة",
    "猫",
    "が好き",
    "고양이",
    "кошка",
    "café",
    "e\u0301",
    "🐱",
    "❤️",
    "&amp;",
    "!",
]
captions = st.one_of(
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map(" ".join),
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\ufffd"), min_size=1, max_size=24),
    st.lists(
        st.one_of(st.sampled_from(WORDS), st.text(st.characters(min_codepoint=0x300, max_codepoint=0x36F), max_size=2)),
        min_size=1,
        max_size=10,
    ).map("".join),
)


# tokenize reads control characters as spaces
BLANK = str.maketrans({c: " " for c in map(chr, [*range(0x20), *range(0x7F, 0xA0)])})


def _check_readable(text: str, caption) -> None:
    n = len(caption.token_ids)
    assert len(caption.labels) == len(caption.spans) == n
    covered = [False] * len(text)
    for label, (start, end) in zip(caption.labels, caption.spans):
        assert "\ufffd" not in label and label
        assert 0 <= start <= end <= len(text)
        for c in range(start, end):
            covered[c] = True
    for c, char in enumerate(text.translate(BLANK)):
        assert covered[c] or char.isspace(), (text, c, char, caption.labels, caption.spans)


@pytest.mark.parametrize("kind", ["clip", *KINDS])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=captions)
def test_every_caption_gets_readable_labels_and_spans_that_cover_it(all_tokenizers, kind, text):
    tokenizer = all_tokenizers[kind]
    try:
        caption = tokenize(tokenizer, text)
    except InputError as err:
        assume(False)  # refused captions have no labels; their refusals are tested below
        raise AssertionError from err
    _check_readable(text, caption)
    # the ids are open_clip's own, cut before the padding
    full = tokenizer([text.translate(BLANK)])[0].tolist()
    n = len(caption.token_ids)
    assert caption.token_ids.tolist() == full[:n]
    pad = caption_tokenizer(tokenizer).pad_id
    assert all(i == pad for i in full[n:])
    prefix = caption_tokenizer(tokenizer).prefix_length
    assert all(span == (0, 0) for span in caption.spans[:prefix])


def test_byte_pieces_of_arabic_join_into_their_characters(all_tokenizers):
    text = "قطة على السجادة"
    caption = tokenize(all_tokenizers["clip"], text)
    assert not any("\ufffd" in label for label in caption.labels)
    pieces = [text[a:b] for a, b in dict.fromkeys(caption.spans[1:-1])]  # joined fragments share a span
    assert "".join(pieces) == text.replace(" ", "")
    # fragments of one character share its span and label
    emoji = tokenize(all_tokenizers["byte_bpe"], "🦒")
    assert len(emoji.token_ids) > 3 and set(emoji.labels[1:-1]) == {"🦒"} and set(emoji.spans[1:-1]) == {(0, 1)}


def test_clip_labels_are_what_the_model_reads_and_spans_what_the_user_wrote(all_tokenizers):
    caption = tokenize(all_tokenizers["clip"], "A  Photo of a CAT &amp; dog!")
    assert caption.labels == ("<start_of_text>", "a", "photo", "of", "a", "cat", "&", "dog", "!", "<end_of_text>")
    text = "A  Photo of a CAT &amp; dog!"
    assert [text[a:b] for a, b in caption.spans[1:-1]] == ["A", "Photo", "of", "a", "CAT", "&amp;", "dog", "!"]


def test_punctuation_siglip_deletes_belongs_to_the_word_before(all_tokenizers):
    text = "a cat!"
    caption = tokenize(all_tokenizers["siglip"], text)
    assert text[slice(*caption.spans[-2])].endswith("!")


@pytest.mark.parametrize(
    "kind, reference",
    [
        ("clip", ["<start_of_text>", "!", "<end_of_text>"]),
        ("byte_bpe", ["<s>", "<s>", "</s>"]),
        ("unigram", ["<s>", "<s>", "</s>"]),
        ("nllb", ["eng_Latn", "<s>", "</s>"]),
        ("siglip", ["<pad>", "</s>"]),
        ("byte_fallback_bpe", ["<pad>", "<eos>"]),
        ("wordpiece", ["[CLS]", "[PAD]", "[PAD]"]),
    ],
)
def test_the_reference_is_id_0_inside_the_tokenizers_special_tokens(all_tokenizers, kind, reference):
    tok = caption_tokenizer(all_tokenizers[kind])
    assert [tok.special_label(i) if i != 0 or kind != "clip" else "!" for i in tok.reference_ids] == reference
    assert 0 in tok.reference_ids


@pytest.mark.parametrize(
    "kind, text, special",
    [("byte_bpe", "a </s> cat", "</s>"), ("unigram", "<s> a cat", "<s>"), ("nllb", "a fra_Latn cat", "fra_Latn")],
)
def test_special_tokens_in_captions_are_refused(all_tokenizers, kind, text, special):
    with pytest.raises(InputError, match=f"^caption: contains '{special}', which the tokenizer reads as a special"):
        tokenize(all_tokenizers[kind], text)


def test_the_unknown_token_is_no_special_token_and_is_labelled_by_its_text(all_tokenizers):
    caption = tokenize(all_tokenizers["wordpiece"], "a cat ☃")  # not in the vocabulary
    tok = all_tokenizers["wordpiece"].tokenizer
    assert tok.unk_token_id in caption.token_ids.tolist() and "☃" in caption.labels


def test_long_captions_are_refused_with_the_true_count(all_tokenizers):
    caption = " ".join(["cat"] * 40)
    n = len(all_tokenizers["wordpiece"].tokenizer(caption)["input_ids"])
    with pytest.raises(InputError, match=f"^caption: has {n} tokens including the special tokens; the model's limit"):
        tokenize(all_tokenizers["wordpiece"], caption)


def test_align_maps_cleaned_characters_back():
    original = "A &amp; B\u00a0 ﬁne"
    cleaned = "a & b fine"
    spans = align(original, cleaned)
    assert [original[a:b] for a, b in spans] == ["A", " ", "&", "amp; ", "B", "\u00a0 ", "ﬁ", "ﬁ", "n", "e"]


def test_load_tokenizer_reads_a_local_directory_with_the_architectures_options(tmp_path):
    name = register_tiny_hf_clip(tmp_path, "nllb")
    tok = load_tokenizer(name, str(tmp_path / "nllb"))
    assert tok.context_length == 77 and tok.special_label(tok.reference_ids[0]) == "eng_Latn"
    siglip = load_tokenizer("ViT-B-16-SigLIP", str(save_tokenizer(tmp_path / "sp", "siglip")))
    assert siglip.context_length == 64 and tokenize(siglip, "A cat!").labels[:2] == ("▁", "a")
    with pytest.raises(TokenizerLoadError, match="does not exist"):
        load_tokenizer(name, str(tmp_path / "missing"))
    with pytest.raises(TokenizerLoadError, match="cannot load a Hugging Face tokenizer"):
        load_tokenizer(name, str(tmp_path))


def test_model_specs_name_a_tokenizer_directory_in_both_forms():
    from explain_server.model_spec import ModelSpec

    spec = ModelSpec.parse("x=xlm-roberta-base-ViT-B-32:/w/a,b.pt,tokenizer=/tok/xlm-r,n_steps=5")
    assert (spec.pretrained, spec.tokenizer, spec.n_steps) == ("/w/a,b.pt", "/tok/xlm-r", 5)
    assert ModelSpec.parse("b32=ViT-B-32:openai").tokenizer is None
    table = {"name": "x", "architecture": "ViT-B-16-SigLIP", "pretrained": "webli", "tokenizer": "/tok/siglip"}
    assert ModelSpec.from_table(table).tokenizer == "/tok/siglip"
    with pytest.raises(ValueError, match="option tokenizer is given twice"):
        ModelSpec.parse("x=A:openai,tokenizer=/a,tokenizer=/b")
