"""A RETRO whose decoder is a Hugging Face GPT-2: the HF sublayers, our CCA and encoder.

Why wrap instead of mapping the weights into our decoder: our decoder uses RMSNorm,
rotary positions, bias-free linears and SwiGLU/exact GELU, while GPT-2 uses LayerNorm,
learned absolute positions, biases and the tanh GELU. No RetroConfig expresses GPT-2,
so a weight mapping could not keep "retrieval off == the source model". Instead
`GPT2Retro` is a `Retro` (same forward/step/cache/checkpoint code) whose decoder
sublayers are GPT-2's own module classes (`nn.LayerNorm`, HF `Conv1D`, HF `GPT2MLP` with
the model's activation) plus learned position embeddings; only the attention product is
ours, so it can use the Retro KV cache. CCA layers and the neighbour encoder are the
ordinary Retro ones (rotary positions inside chunk and neighbour).

The checkpoint is an ordinary retrolm model directory; `config.extra["decoder"] ==
"hf-gpt2"` and `config.extra["hf_config"]` (the source config.json) say how to rebuild
it. `retrolm.checkpoints.load_checkpoint` loads it like any other model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrolm.errors import RetrolmError
from retrolm.model.config import RetroConfig, default_cca_layers
from retrolm.model.layers import LayerKV
from retrolm.model.retro import Mixture, Retro, RetroCache

DECODER_KIND = "hf-gpt2"
_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu", "silu", "gelu_fast")


def _hf_gpt2_config(hf_config: dict[str, Any], dropout: float) -> Any:
    from transformers import GPT2Config

    data = dict(hf_config)
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        data[key] = dropout
    return GPT2Config.from_dict(data)


class GPT2SelfAttention(nn.Module):
    """GPT-2 causal self-attention (HF Conv1D projections) over the Retro KV cache."""

    def __init__(self, hf_cfg: Any, layer_idx: int):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        d = hf_cfg.n_embd
        self.n_heads = hf_cfg.n_head
        self.c_attn = Conv1D(3 * d, d)
        self.c_proj = Conv1D(d, d)
        self.attn_dropout = float(hf_cfg.attn_pdrop)
        self.resid_dropout = nn.Dropout(hf_cfg.resid_pdrop)
        self.scale = (d // self.n_heads) ** -0.5 if hf_cfg.scale_attn_weights else 1.0
        if hf_cfg.scale_attn_by_inverse_layer_idx:
            self.scale /= float(layer_idx + 1)

    def forward(
        self,
        x: Tensor,  # (B, t, C)
        cos: Tensor | None = None,  # unused: GPT-2 positions are learned embeddings
        sin: Tensor | None = None,
        *,
        causal: bool = True,
        cache: LayerKV | None = None,
        key_mask: Tensor | None = None,
    ) -> Tensor:
        B, t, C = x.shape
        q, k, v = self.c_attn(x).view(B, t, 3, self.n_heads, C // self.n_heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, t, hd)
        drop = self.attn_dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=drop, scale=self.scale
            )
        else:
            past = cache.length
            k, v = cache.append(k, v)  # (B, H, past + t, hd)
            rows = torch.arange(t, device=x.device)[:, None] + past
            mask = torch.arange(past + t, device=x.device)[None, :] <= rows  # (t, past + t)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=drop, scale=self.scale
            )
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, t, C)))


class GPT2Retro(Retro):
    """Retro with a GPT-2 decoder (see the module docstring); a GPT-2 when cca_layers is []."""

    def __init__(self, config: RetroConfig):
        if config.extra.get("decoder") != DECODER_KIND or "hf_config" not in config.extra:
            raise RetrolmError("GPT2Retro needs config.extra with decoder='hf-gpt2' and hf_config")
        super().__init__(config)
        from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

        hf_cfg = _hf_gpt2_config(config.extra["hf_config"], config.dropout)
        d, eps = config.d_model, hf_cfg.layer_norm_epsilon
        self.n_positions = int(hf_cfg.n_positions)
        self.pos_emb = nn.Embedding(self.n_positions, d)
        self.drop = nn.Dropout(hf_cfg.embd_pdrop)
        for i, block in enumerate(self.blocks):
            block.norm_attn = nn.LayerNorm(d, eps=eps)
            block.attn = GPT2SelfAttention(hf_cfg, i)
            block.norm_mlp = nn.LayerNorm(d, eps=eps)
            block.mlp = GPT2MLP(config.d_ff, hf_cfg)
            block.drop = nn.Identity()  # GPT-2's sublayers apply their own residual dropout
        self.norm = nn.LayerNorm(d, eps=eps)

    def _run(
        self, tokens: Tensor, start: int, cache: RetroCache | None, source: Any
    ) -> tuple[Tensor, Tensor | None, Mixture | None]:
        """Retro._run with GPT-2's learned positions added to the token embedding."""
        B, t = tokens.shape
        if start + t > self.n_positions:
            raise RetrolmError(
                f"this GPT-2 decoder has learned positions for {self.n_positions} tokens, "
                f"got position {start + t - 1}; use shorter sequences"
            )
        positions = torch.arange(start, start + t, device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(positions))  # (B, t, C)
        context = None
        for i, block in enumerate(self.blocks):
            kv = cache.kv[i] if cache is not None else None
            x = x + block.attn(block.norm_attn(x), causal=True, cache=kv)
            if i == self.first_cca and source is not None:
                context = self._context(x, start, cache, source)
            if block.cca is not None and context is not None:
                x = x + self._cca(block, x, start, context)
            x = x + block.mlp(block.norm_mlp(x))
        return self._head(x, tokens, start, cache, source is not None, context)


# -- from a Hugging Face directory --------------------------------------------------------------


def read_hf_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The config.json of a local HF model directory, checked to be a GPT-2 we can wrap."""
    file = Path(path) / "config.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise RetrolmError(f"cannot read {file}: {err}; pass a local Hugging Face model directory") from None
    if data.get("model_type") != "gpt2":
        raise RetrolmError(
            f"{path}: model_type {data.get('model_type')!r} is not supported; "
            "retro-fitting from Hugging Face supports GPT-2-family models (model_type 'gpt2')"
        )
    if data.get("activation_function", "gelu_new") not in _ACTIVATIONS:
        raise RetrolmError(
            f"{path}: activation {data.get('activation_function')!r} is not supported; "
            f"use one of {list(_ACTIVATIONS)}"
        )
    return data


def load_hf_causal_lm(path: str | os.PathLike[str]) -> nn.Module:
    """The HF causal LM in `path`, loaded from local files only (never downloaded)."""
    from transformers import AutoModelForCausalLM

    read_hf_config(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise RetrolmError(f"cannot load the Hugging Face model in {path}: {err}") from None
    return model.eval()


def gpt2_retro_config(
    hf_config: dict[str, Any],
    vocab_size: int,
    chunk_size: int,
    *,
    cca_layers: list[int] | None = None,
    enc_layers: int = 2,
    enc_d_model: int | None = None,
    enc_heads: int | None = None,
    n_neighbors: int = 2,
    pad_id: int = 0,
    dropout: float = 0.0,
) -> RetroConfig:
    """RetroConfig for a GPT-2 decoder; vocab may exceed GPT-2's by a few added specials."""
    hf_vocab = int(hf_config.get("vocab_size", 50257))
    if not hf_vocab <= vocab_size <= hf_vocab + 8:
        raise RetrolmError(
            f"the database vocabulary ({vocab_size}) does not match the GPT-2 vocabulary "
            f"({hf_vocab}); build the database with --tokenizer <the model directory>"
        )
    d = int(hf_config.get("n_embd", 768))
    n_layers = int(hf_config.get("n_layer", 12))
    heads = int(hf_config.get("n_head", 12))
    n_positions = int(hf_config.get("n_positions", 1024))
    return RetroConfig(
        vocab_size=vocab_size,
        n_layers=n_layers,
        d_model=d,
        n_heads=heads,
        mlp="gelu",
        d_ff=int(hf_config.get("n_inner") or 4 * d),
        chunk_size=chunk_size,
        n_neighbors=n_neighbors,
        cca_layers=default_cca_layers(n_layers) if cca_layers is None else cca_layers,
        enc_layers=enc_layers,
        enc_d_model=enc_d_model,
        enc_heads=enc_heads,
        dropout=dropout,
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", True)),
        max_seq_len=n_positions,
        pad_id=pad_id,
        norm_eps=float(hf_config.get("layer_norm_epsilon", 1e-5)),
        extra={"decoder": DECODER_KIND, "hf_config": hf_config, "hf_vocab_size": hf_vocab},
    )


def copy_hf_weights(model: GPT2Retro, hf_model: nn.Module) -> None:
    """Copy the HF GPT-2's weights into the decoder of `model` (CCA / encoder untouched).

    Token rows beyond GPT-2's vocabulary (specials the database tokenizer added) get
    the mean embedding.
    """
    src = hf_model.state_dict()
    prefix = "transformer."
    hf_vocab = int(model.config.extra["hf_vocab_size"])
    with torch.no_grad():
        wte = src[prefix + "wte.weight"]
        model.tok_emb.weight[:hf_vocab] = wte
        model.tok_emb.weight[hf_vocab:] = wte.mean(0)
        model.pos_emb.weight.copy_(src[prefix + "wpe.weight"])
        model.norm.load_state_dict(_sub(src, prefix + "ln_f."))
        for i, block in enumerate(model.blocks):
            p = f"{prefix}h.{i}."
            block.norm_attn.load_state_dict(_sub(src, p + "ln_1."))
            block.norm_mlp.load_state_dict(_sub(src, p + "ln_2."))
            block.mlp.load_state_dict(_sub(src, p + "mlp."))
            block.attn.c_attn.load_state_dict(_sub(src, p + "attn.c_attn."))
            block.attn.c_proj.load_state_dict(_sub(src, p + "attn.c_proj."))
        if not model.config.tie_embeddings:
            head = src["lm_head.weight"]
            model.lm_head.weight[:hf_vocab] = head
            model.lm_head.weight[hf_vocab:] = head.mean(0)


def _sub(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise RetrolmError(f"the Hugging Face weights have no {prefix}*; is this a GPT-2?")
    return out


def is_gpt2_retro_config(config: RetroConfig) -> bool:
    """True for the config of a retro-fitted GPT-2 (a `GPT2Retro`)."""
    return config.extra.get("decoder") == DECODER_KIND
