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

import sys

import torch
from open_clip.hf_model import HFTextEncoder
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..split import Layer, RowSplit, SplitTower, UnsupportedModelError
from ..towers import select_rows

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
        self.config = config
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
        # ``head`` only where the pooler reads every token (a mean): a class-token pooler reads one
        self.layers = tuple(Layer(f"block {i}") for i in range(n))
        if type(text.pooler).__name__ in ("MeanPooler", "MaxPooler"):
            self.layers += (Layer("head"),)
        # the pooler's input where it reads every row, else the last block's
        self.default_layer = len(self.layers) - 1
        # measured on xlm-roberta-base-ViT-B-32 (benchmarks/choose_defaults.py)
        self.default_method, self.default_n_steps = "gausslegendre", 3
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
        if layer < len(self.blocks):
            mask = self._attention_mask(keys, hidden.dtype)
            for block in self.blocks[layer:-1]:
                hidden = block(hidden, mask)
            # a class-token pooler reads row 0 alone: the last layer computes that row only
            hidden = self._last_block(self._row_start(hidden), self._pooled_rows(hidden), mask)
        return self._pool(hidden, keys, layer)

    def _pool(self, hidden: torch.Tensor, keys: torch.Tensor, layer: int) -> torch.Tensor:
        """The embedding from the pooler's input (B, S, d) (at ``layer`` < ``head``, the last
        encoder layer's output, before the final norm; one row when only row 0 is pooled)."""
        if layer < len(self.blocks):
            hidden = self.final_norm(hidden)
        pooler = getattr(self.text.transformer, "pooler", None)
        if pooler is not None:  # cls_pooler reads the encoder's own pooler output where it has one
            out: BaseModelOutput = BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooler(hidden))
        else:
            out = BaseModelOutput(last_hidden_state=hidden)
        return self.text.proj(self.text.pooler(out, keys))

    def _pooled_rows(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """(B, 1) int64: row 0 where the pooler reads the first token alone; None: every row."""
        if type(self.text.pooler).__name__ not in ("ClsPooler", "ClsLastHiddenStatePooler"):
            return None
        return torch.zeros(hidden.shape[0], 1, dtype=torch.long, device=hidden.device)

    def _attention(self, block: torch.nn.Module) -> torch.nn.Module:
        return block.attention.self if self.model_type in _BERT_LIKE else block.self_attn

    def _row_start(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's row-wise start: (B, R, d) -> (B, R, 4d), ``[x, q, k, v]`` (M2M-100:
        projections of its pre-attention LayerNorm)."""
        block = self.blocks[-1]
        attention = self._attention(block)
        if self.model_type in _BERT_LIKE:
            return torch.cat([x, attention.query(x), attention.key(x), attention.value(x)], dim=-1)
        y = block.self_attn_layer_norm(x)
        return torch.cat([x, attention.q_proj(y), attention.k_proj(y), attention.v_proj(y)], dim=-1)

    def _last_block(self, start: torch.Tensor, rows: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        """The last encoder layer from its row-wise start (B, S, 4d), for the query ``rows`` (B, Q)
        (None: all S), with the model's own modules and attention function: (B, Q, d).

        ``mask`` is the model's additive (B, 1, S, S) attention mask, or None."""
        block = self.blocks[-1]
        attention = self._attention(block)
        x, q, k, v = start.split(start.shape[-1] // 4, dim=-1)
        if rows is not None:
            x, q = select_rows(x, rows), select_rows(q, rows)
            if mask is not None:
                mask = torch.take_along_dim(mask, rows[:, None, :, None], dim=2)
        batch, queries, width = q.shape
        head_dim = width // self.config.num_attention_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, -1, self.config.num_attention_heads, head_dim).transpose(1, 2)

        function = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, sys.modules[type(attention).__module__].eager_attention_forward
        )
        out = function(attention, heads(q), heads(k), heads(v), mask, scaling=attention.scaling, dropout=0.0)[0]
        out = out.reshape(batch, queries, width)
        if self.model_type in _BERT_LIKE:
            out = block.attention.output(out, x)
            return block.output(block.intermediate(out), out)  # RobertaLayer.feed_forward_chunk
        x = x + attention.out_proj(out)
        x = x + block.fc2(block.activation_fn(block.fc1(block.final_layer_norm(x))))
        if x.dtype == torch.float16:  # as M2M100EncoderLayer
            bound = torch.finfo(x.dtype).max - 1000
            x = torch.clamp(x, min=-bound, max=bound)
        return x

    def row_split(self, layer: int) -> RowSplit | None:
        """At the last encoder layer: its row-wise start (the input beside its q, k, v) and the
        rest; a class-token pooler's row alone then moves through attention and MLP."""
        if layer != len(self.blocks) - 1:
            return None

        def rest(start: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            keys = self._key_mask(lengths, start.shape[1])
            mask = self._attention_mask(keys, start.dtype)
            return self._pool(self._last_block(start, self._pooled_rows(start), mask), keys, layer)

        return RowSplit(lambda x, positions: self._row_start(x), rest)
