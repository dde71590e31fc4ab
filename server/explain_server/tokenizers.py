"""Caption tokenizers of every open_clip model, behind one interface the service explains with.

open_clip tokenises captions with its CLIP BPE (:class:`~open_clip.tokenizer.SimpleTokenizer`)
or with a Hugging Face tokenizer (:class:`~open_clip.tokenizer.HFTokenizer`: SigLIP's and
SigLIP2's sentencepiece vocabularies, CLIPA's BERT WordPiece, the XLM-RoBERTa, RoBERTa and NLLB
towers, MetaCLIP 2's XLM-V). :class:`CaptionTokenizer` gives, for any of them, the sequence the
text tower sees from its start to its end (no padding), each content token's readable label and
where it stands in the cleaned caption, the pad id, the reference sequence, and the special
tokens a caption may not spell.

**Reference input** (the text baseline of method.md): the tokenizer's own special tokens around
one token of id 0, with exactly the processing a caption gets (e.g. CLIPA's end token replaced by
0). For CLIP that is exclip's [start, 0, end]; for RoBERTa and XLM-RoBERTa [<s>, <s>, </s>], for
NLLB [lang, <s>, </s>], for SigLIP [0, </s>], for CLIPA [[CLS], [PAD], [PAD]]: id 0 is the first
entry of every vocabulary, a fixed token that carries no content of the caption, as in exclip.

Hugging Face tokenizers load from a local directory (``tokenizer=PATH`` in a model spec) so that
nothing is downloaded; open_clip's own lookup (which may download) is used only without one.
"""

from __future__ import annotations

import os
import weakref

import open_clip
from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer, SimpleTokenizer, basic_clean, canonicalize_text

from .token_spans import Piece


class TokenizerLoadError(ValueError):
    """A model's tokenizer cannot be built or is of a kind the service does not read; the message says why."""


class CaptionTokenizer:
    """A caption tokenizer as the service needs it.

    Attributes:
        context_length: most ids a caption's sequence may have, special tokens included.
        pad_id: the id that pads sequences to the context length.
        reference_ids: the reference input's sequence (module docstring).
        refused_ids: ids a caption may not produce from its text (special tokens; never the
            unknown token), in the order they are reported.
        counted: what the length limit counts, for messages ("the start and end tokens").
    """

    context_length: int
    pad_id: int
    reference_ids: tuple[int, ...]
    refused_ids: tuple[int, ...]
    counted: str

    def encode(self, text: str) -> tuple[str, list[Piece], list[int]]:
        """Tokenise ``text`` (not truncated, not padded).

        Returns:
            (cleaned, pieces, sequence): the text after the tokenizer's cleaning; the content
            tokens with their characters in it; the ids the text tower reads, from its first
            special token to its last (``sequence[prefix:prefix + len(pieces)]`` are the pieces'
            ids, with ``prefix`` = :attr:`prefix_length`).
        """
        raise NotImplementedError

    prefix_length: int
    """Special tokens before the content in every sequence."""

    def special_label(self, token_id: int) -> str:
        """The text of a special token, e.g. ``<start_of_text>``."""
        raise NotImplementedError

    def refusal(self, token_id: int) -> str:
        """Why a caption that produces ``token_id`` (one of :attr:`refused_ids`) is refused."""
        return f"contains {self.special_label(token_id)!r}, which the tokenizer reads as a special token; remove it"


class ClipTokenizer(CaptionTokenizer):
    """open_clip's CLIP BPE (byte-level BPE over the lower-cased, cleaned caption)."""

    counted = "the start and end tokens"
    prefix_length = 1

    def __init__(self, tokenizer: SimpleTokenizer):
        self.tokenizer = tokenizer
        self.context_length = tokenizer.context_length
        self.pad_id = 0
        sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
        self.reference_ids = (sot, 0, eot)
        self.refused_ids = (sot, eot)

    def encode(self, text: str) -> tuple[str, list[Piece], list[int]]:
        tok = self.tokenizer
        cleaned = tok.clean_fn(text)
        pieces = []
        # SimpleTokenizer.encode, keeping where each word and each of its BPE pieces lies
        for word in tok.pat.finditer(cleaned):
            char_of_byte = [k for k, char in enumerate(word.group()) for _ in char.encode("utf-8")]
            byte = 0
            for bpe in tok.bpe("".join(tok.byte_encoder[b] for b in word.group().encode("utf-8"))).split(" "):
                raw = bytes(tok.byte_decoder[c] for c in bpe.replace("</w>", ""))
                first, last = char_of_byte[byte], char_of_byte[byte + len(raw) - 1]
                try:
                    label: str | None = raw.decode("utf-8")
                except UnicodeDecodeError:
                    label = None  # part of a character's bytes
                pieces.append(Piece(tok.encoder[bpe], word.start() + first, word.start() + last + 1, label))
                byte += len(raw)
        sequence = [tok.sot_token_id, *(p.token_id for p in pieces), tok.eot_token_id]
        return cleaned, pieces, sequence

    def special_label(self, token_id: int) -> str:
        return self.tokenizer.decoder[token_id]

    def refusal(self, token_id: int) -> str:
        return (
            f"contains {self.special_label(token_id)!r}, which the tokenizer reads as a special token (after "
            "lower-casing, decoding HTML entities and deleting invisible characters); remove it"
        )


class HuggingFaceTokenizer(CaptionTokenizer):
    """A Hugging Face fast tokenizer as open_clip's HFTokenizer (or SigLipTokenizer) drives it.

    The sequence is what ``HFTokenizer.__call__`` returns before its padding: open_clip's
    cleaning, the tokenizer's own special tokens, CLIPA's ``strip_sep_token`` (the separator
    becomes 0).

    Raises:
        TokenizerLoadError: a slow tokenizer (no character offsets), open_clip's ``clips``
            tokenizer mode, or special tokens inside the sequence's content.
    """

    counted = "the special tokens"

    def __init__(self, wrapped: HFTokenizer):
        if getattr(wrapped, "tokenizer_mode", ""):
            raise TokenizerLoadError(f"open_clip tokenizer mode {wrapped.tokenizer_mode!r} is not supported")
        self.hf = wrapped.tokenizer
        if not getattr(self.hf, "is_fast", False):
            raise TokenizerLoadError(
                f"tokenizer {type(self.hf).__name__} is not a fast tokenizer (a tokenizer.json); the service needs "
                "the character offsets only fast tokenizers give"
            )
        # SigLipTokenizer has no clean_fn: it always canonicalises
        self.clean = getattr(wrapped, "clean_fn", None) or (lambda text: canonicalize_text(basic_clean(text)))
        self.sep_to_zero = getattr(wrapped, "strip_sep_token", False)
        self.context_length = wrapped.context_length
        self.pad_id = self.hf.pad_token_id
        probe = self.hf("a", add_special_tokens=True, return_special_tokens_mask=True)
        ids, mask = probe["input_ids"], probe["special_tokens_mask"]
        content = [k for k, special in enumerate(mask) if not special]
        self.prefix_length = content[0]
        self.reference_ids = tuple(self._processed([*ids[: content[0]], 0, *ids[content[-1] + 1 :]]))
        special = set(self.hf.all_special_ids) | {i for i, t in self.hf.added_tokens_decoder.items() if t.special}
        self.refused_ids = tuple(sorted(special - {self.hf.unk_token_id}))

    def _processed(self, ids: list[int]) -> list[int]:
        if self.sep_to_zero:
            return [0 if i == self.hf.sep_token_id else i for i in ids]
        return ids

    def encode(self, text: str) -> tuple[str, list[Piece], list[int]]:
        cleaned = self.clean(text)
        enc = self.hf(cleaned, add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True)
        ids, mask, offsets = enc["input_ids"], enc["special_tokens_mask"], enc["offset_mapping"]
        content = [k for k, special in enumerate(mask) if not special]
        if content and (content[0] != self.prefix_length or content[-1] - content[0] + 1 != len(content)):
            raise TokenizerLoadError("the tokenizer puts special tokens inside a caption's tokens")
        pieces = []
        for k in content:
            start, end = offsets[k]
            if cleaned[start:end].strip():  # some tokenizers count the space before a word as its own
                start += len(cleaned[start:end]) - len(cleaned[start:end].lstrip())
                end -= len(cleaned[start:end]) - len(cleaned[start:end].rstrip())
            token_id = ids[k]
            own = self.hf.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if token_id == self.hf.unk_token_id and cleaned[start:end].strip():
                label: str | None = cleaned[start:end].strip()  # what the unknown token stands for
            elif "\ufffd" in own and "\ufffd" not in cleaned[start:end]:
                label = None  # part of a character's bytes (byte-level BPE, byte fallback)
            else:
                label = own.strip()
            pieces.append(Piece(token_id, start, end, label))
        return cleaned, pieces, self._processed(ids)

    def special_label(self, token_id: int) -> str:
        return self.hf.convert_ids_to_tokens(token_id)


_WRAPPED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def caption_tokenizer(tokenizer: object) -> CaptionTokenizer:
    """``tokenizer`` as a :class:`CaptionTokenizer`: itself, or open_clip's tokenizer wrapped (once per object).

    Raises:
        TokenizerLoadError: a tokenizer of a kind the service does not read.
    """
    if isinstance(tokenizer, CaptionTokenizer):
        return tokenizer
    wrapped = _WRAPPED.get(tokenizer)
    if wrapped is None:
        if isinstance(tokenizer, SimpleTokenizer):
            wrapped = ClipTokenizer(tokenizer)
        elif hasattr(tokenizer, "tokenizer") and hasattr(tokenizer, "context_length"):
            wrapped = HuggingFaceTokenizer(tokenizer)
        else:
            raise TokenizerLoadError(f"tokenizer {type(tokenizer).__name__} is not supported")
        _WRAPPED[tokenizer] = wrapped
    return wrapped


def load_tokenizer(architecture: str, directory: str | None = None) -> CaptionTokenizer:
    """The caption tokenizer of an open_clip architecture.

    Args:
        architecture: an open_clip architecture name (its config gives the context length,
            cleaning and tokenizer options).
        directory: a local directory holding a Hugging Face tokenizer (``tokenizer.json`` and
            its config, as ``save_pretrained`` writes them), used instead of the one the
            architecture names on the hub; nothing is downloaded. None: open_clip's own choice
            (CLIP BPE ships with open_clip; hub tokenizers download or come from the cache).

    Raises:
        TokenizerLoadError: the directory is missing or holds no tokenizer, the hub tokenizer
            is unavailable (offline), or the tokenizer is of a kind the service does not read.
    """
    if directory is None:
        try:
            return caption_tokenizer(open_clip.get_tokenizer(architecture))
        except TokenizerLoadError:
            raise
        except Exception as err:  # hub lookups raise OSError, HTTP and value errors
            raise TokenizerLoadError(
                f"cannot load the tokenizer of {architecture}: {err}; offline, give a local tokenizer directory "
                "(the model option tokenizer=PATH)"
            ) from err
    if not os.path.isdir(directory):
        raise TokenizerLoadError(f"tokenizer directory {directory} does not exist")
    text_cfg = (open_clip.get_model_config(architecture) or {}).get("text_cfg", {})
    try:
        tokenizer = HFTokenizer(
            directory,
            context_length=text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH),
            tokenizer_mode=text_cfg.get("tokenizer_mode"),
            **text_cfg.get("tokenizer_kwargs", {}),
        )
    except Exception as err:  # transformers raises OSError, ValueError and others for a bad directory
        raise TokenizerLoadError(f"cannot load a Hugging Face tokenizer from {directory}: {err}") from err
    return caption_tokenizer(tokenizer)


def hf_tokenizer(directory: str, context_length: int) -> CaptionTokenizer:
    """The tokenizer of a transformers model (``hf:`` specs) from its directory or hub id.

    Raises:
        TokenizerLoadError: no tokenizer there, or one of a kind the service does not read.
    """
    try:
        tokenizer = HFTokenizer(directory, context_length=context_length)
    except Exception as err:  # transformers raises OSError, ValueError and others for a bad directory
        raise TokenizerLoadError(f"cannot load a Hugging Face tokenizer from {directory}: {err}") from err
    return caption_tokenizer(tokenizer)


def spec_tokenizer(spec, context_length: int) -> CaptionTokenizer:
    """The tokenizer of a model spec: a transformers model's own (``hf:``), else the open_clip
    architecture's, from the spec's ``tokenizer`` directory when it names one.

    Raises:
        TokenizerLoadError: as :func:`load_tokenizer` and :func:`hf_tokenizer`.
    """
    if spec.hf_source is not None:
        return hf_tokenizer(spec.tokenizer or spec.hf_source, context_length)
    return load_tokenizer(spec.architecture, spec.tokenizer)
