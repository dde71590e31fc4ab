"""Hugging Face text towers inside open_clip (:class:`open_clip.hf_model.HFTextEncoder`).

open_clip's multilingual models (roberta-ViT-B-32, xlm-roberta-base-ViT-B-32,
xlm-roberta-large-ViT-H-14, nllb-clip-base/-large and their -siglip variants) read captions with a
Hugging Face encoder: RoBERTa, XLM-RoBERTa, or NLLB's M2M-100 encoder. The tower is embeddings,
bidirectional encoder layers under a key mask of the caption's tokens, (M2M-100: a final
LayerNorm), a pooler (mean over the caption's tokens, or its first token, through the encoder's
own pooler for ``cls_pooler`` where it has one), and a linear or MLP projection.

Layers: ``block i`` is the input of encoder layer i; ``head`` the pooler's input (after the
final LayerNorm). Padding is masked out as keys and never pooled, so ``sees_padding`` is False:
positions after a caption's ``lengths[b]`` tokens cannot change its embedding.
"""

from __future__ import annotations

import torch
from open_clip.hf_model import HFTextEncoder
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling

from ..split import Layer, SplitTower, UnsupportedModelError

# model types whose encoder is embeddings -> encoder.layer[i] (BERT-like); M2M-100 apart
_BERT_LIKE = ("roberta", "xlm-roberta", "bert")
# RoBERTa numbers positions from pad_token_id + 1, so that many fewer fit its position table
_POSITIONS_FROM_PAD = ("roberta", "xlm-roberta")


class HFTextTower(SplitTower):
    """An :class:`HFTextEncoder` split at the input of one of its encoder layers, or its pooler's.

    Sets the Hugging Face model's attention to the explicit ("eager") implementation, whose
    maths is the same as the fused kernels' but which ``torch.func`` transforms.

    Raises:
        UnsupportedModelError: an encoder type other than RoBERTa, XLM-RoBERTa, BERT or M2M-100.
    """

    sees_padding = False

    def __init__(self, text: HFTextEncoder):
        config = text.transformer.config
        self.text = text
        self.model_type = config.model_type
        if self.model_type in _BERT_LIKE:
            self.blocks = text.transformer.encoder.layer
            self.final_norm: torch.nn.Module = torch.nn.Identity()
        elif self.model_type == "m2m_100":
            self.blocks = text.transformer.layers
            self.final_norm = text.transformer.layer_norm
        else:
            raise UnsupportedModelError(
                f"text tower: Hugging Face encoder type {self.model_type!r} is not supported "
                f"(supported: {', '.join((*_BERT_LIKE, 'm2m_100'))})"
            )
        text.transformer.set_attn_implementation("eager")
        self.embed_dim = text.output_dim
        n = len(self.blocks)
        self.layers = (*(Layer(f"block {i}") for i in range(n)), Layer("head"))
        self.default_layer = n - 1
        self.pad_id = config.pad_token_id
        positions = config.max_position_embeddings
        self.context_length = (
            positions - config.pad_token_id - 1 if self.model_type in _POSITIONS_FROM_PAD else positions
        )

    def _key_mask(self, lengths: torch.Tensor, seq: int) -> torch.Tensor:
        """(B, S) long: 1 on each caption's tokens, as HFTextEncoder.forward derives it from the pad id."""
        return (torch.arange(seq, device=lengths.device) < lengths[:, None]).long()

    def _attention_mask(self, keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        # the model's own mask for its attention implementation; the embeddings argument only
        # gives shape, dtype and device, so a plain tensor stands in for a transformed one
        shape = torch.zeros((*keys.shape, 1), dtype=dtype, device=keys.device)
        return create_bidirectional_mask(config=self.text.transformer.config, inputs_embeds=shape, attention_mask=keys)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        transformer = self.text.transformer
        if self.model_type == "m2m_100":
            tokens = transformer.embed_tokens(ids)
            return tokens + transformer.embed_positions(ids, tokens).to(tokens.device)
        return transformer.embeddings(input_ids=ids)

    def lower(self, inputs: torch.Tensor, layer: int, lengths: torch.Tensor) -> torch.Tensor:
        hidden = self._embed(inputs)
        mask = self._attention_mask(self._key_mask(lengths, inputs.shape[1]), hidden.dtype)
        for block in self.blocks[:layer]:
            hidden = block(hidden, mask)
        if layer == len(self.blocks):
            hidden = self.final_norm(hidden)
        return hidden

    def upper(self, hidden: torch.Tensor, layer: int, lengths: torch.Tensor) -> torch.Tensor:
        keys = self._key_mask(lengths, hidden.shape[1])
        mask = self._attention_mask(keys, hidden.dtype)
        for block in self.blocks[layer:]:
            hidden = block(hidden, mask)
        if layer < len(self.blocks):
            hidden = self.final_norm(hidden)
        pooler = getattr(self.text.transformer, "pooler", None)
        if pooler is not None:  # cls_pooler reads the encoder's own pooler output where it has one
            out: BaseModelOutput = BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooler(hidden))
        else:
            out = BaseModelOutput(last_hidden_state=hidden)
        return self.text.proj(self.text.pooler(out, keys))
