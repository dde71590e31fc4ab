"""Small Hugging Face tokenizers and text towers built offline, for tests.

:func:`save_tokenizer` trains a tokenizer of one of the kinds open_clip's models use (RoBERTa's
byte-level BPE, XLM-RoBERTa's and NLLB's and SigLIP's sentencepiece Unigram, SigLIP2's Gemma BPE
with byte fallback, CLIPA's BERT WordPiece) on a small multilingual corpus, in memory, and saves
it as ``save_pretrained`` does. :func:`register_tiny_hf_clip` writes a scaled-down open_clip
model config whose text tower is a Hugging Face encoder of that directory (config, seeded random
weights and tokenizer together, like a hub repository). Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModel, PreTrainedTokenizerFast

CORPUS = [
    "a photo of a cat on a mat",
    "two dogs playing in the grass",
    "the quick brown fox jumps over the lazy dog",
    "une photo d'un chat noir",
    "café naïve résumé",
    "صورة قطة على السجادة",
    "سلام عليكم يا صديقي",
    "一只猫坐在垫子上",
    "猫が好きです",
    "고양이 사진",
    "фотография кошки",
    "🐱 🐶 🦊 ❤️",
] * 4

# (model_type of the text tower, tokenizer kind, pooler, projection) per open_clip family
FAMILIES = {
    "roberta": ("roberta", "byte_bpe", "mean_pooler", "mlp"),
    "xlm-roberta": ("xlm-roberta", "unigram", "mean_pooler", "mlp"),
    "nllb": ("m2m_100", "nllb", "cls_pooler", "linear"),
    "bert": ("bert", "wordpiece", "cls_pooler", "mlp"),  # no pretrained model; the encoder's own pooler
}


def _byte_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=320, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        cls_token="<s>",
        sep_token="</s>",
    )


def _unigram(special: list[str], single: str, unk: str = "<unk>") -> Tokenizer:
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=200, special_tokens=special, unk_token=unk))
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, tok.token_to_id(t)) for t in special if t in single.split()]
    )
    return tok


def _byte_fallback_bpe() -> PreTrainedTokenizerFast:
    special = ["<pad>", "<eos>", "<bos>", "<unk>"]
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=special))
    learned = json.loads(trained.to_str())["model"]
    # Gemma's vocabulary holds a token per byte, as ordinary tokens, for characters it lacks
    vocab = dict(learned["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(special)
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def _wordpiece() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def build_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A small trained tokenizer: ``byte_bpe`` (RoBERTa), ``unigram`` (XLM-RoBERTa), ``nllb``
    (Unigram, a language code before the caption), ``siglip`` (Unigram, end token only),
    ``byte_fallback_bpe`` (Gemma, SigLIP2) or ``wordpiece`` (BERT, CLIPA)."""
    if kind == "byte_bpe":
        return _byte_bpe()
    if kind == "byte_fallback_bpe":
        return _byte_fallback_bpe()
    if kind == "wordpiece":
        return _wordpiece()
    if kind == "unigram":
        tok = _unigram(["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "<s> $A </s>")
        names = dict(bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>", mask_token="<mask>")
    elif kind == "nllb":
        tok = _unigram(["<s>", "<pad>", "</s>", "<unk>", "eng_Latn", "fra_Latn"], "eng_Latn $A </s>")
        names = dict(bos_token="<s>", eos_token="</s>", extra_special_tokens=["eng_Latn", "fra_Latn"])
    elif kind == "siglip":
        tok = _unigram(["<pad>", "</s>", "<unk>"], "$A </s>")
        names = dict(eos_token="</s>")
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", **names)


def save_tokenizer(directory: Path, kind: str) -> Path:
    """Train a tokenizer of ``kind`` (see :func:`build_tokenizer`) and save it in ``directory``; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    build_tokenizer(kind).save_pretrained(directory)
    return directory


def _text_config(model_type: str, vocab_size: int, pad_id: int, width: int, layers: int) -> dict:
    if model_type == "m2m_100":
        return {
            "model_type": "m2m_100",
            "vocab_size": vocab_size,
            "d_model": width,
            "encoder_layers": layers,
            "decoder_layers": 1,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "encoder_ffn_dim": 2 * width,
            "decoder_ffn_dim": 2 * width,
            "max_position_embeddings": 128,
            "pad_token_id": pad_id,
            "scale_embedding": True,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "activation_dropout": 0.0,
        }
    return {
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": width,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "intermediate_size": 2 * width,
        "max_position_embeddings": 130,
        "type_vocab_size": 1,
        "pad_token_id": pad_id,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }


def save_text_tower(directory: Path, family: str, *, width: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A hub-like directory for one of :data:`FAMILIES`: the tokenizer, an HF config of the
    scaled-down text encoder and its seeded random weights. Returns ``directory``."""
    model_type, kind, _, _ = FAMILIES[family]
    tokenizer = build_tokenizer(kind)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    config = _text_config(model_type, len(tokenizer), tokenizer.pad_token_id, width, layers)
    (directory / "config.json").write_text(json.dumps(config))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        AutoModel.from_config(AutoConfig.from_pretrained(directory)).save_pretrained(directory)
    # the model's save rewrites config.json; the tokenizer files stay
    return directory


def register_tiny_hf_clip(root: Path, family: str, *, embed_dim: int = 24, width: int = 32, layers: int = 2) -> str:
    """Write and register (``open_clip.add_model_config``) a scaled-down open_clip architecture
    whose text tower is a Hugging Face encoder of ``family`` in ``root/family``, with the pooler
    and projection of the real family, and a one-block 32 px ViT image tower.

    Returns:
        the architecture name, ``tiny-hf-FAMILY``.
    """
    _, _, pooler, proj = FAMILIES[family]
    hf_dir = save_text_tower(root / family, family, width=width, layers=layers)
    name = f"tiny-hf-{family}"
    cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {
            "hf_model_name": str(hf_dir),
            "hf_tokenizer_name": str(hf_dir),
            "hf_proj_type": proj,
            "hf_pooler_type": pooler,
        },
    }
    path = root / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return name
