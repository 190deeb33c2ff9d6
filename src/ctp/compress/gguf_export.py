"""GGUF export for llama.cpp: ctp's codes written as Q4_1 / Q8_0 blocks, without re-quantizing.

A GGUF block holds 32 consecutive weights of a row with one scale (and, for Q4_1, one
minimum) in fp16:

* ``Q4_1``: ``w = d * q + m``, ``q`` in [0, 15]. ctp's ``s * (q - z)`` is that with ``d = s``
  and ``m = -s * z``, so every grid of at most 4 bits whose groups are whole multiples of 32
  columns (or one grid per row) maps code for code: each 32-block takes its group's ``s, z``.
* ``Q8_0``: ``w = d * q``, ``q`` int8. ctp's symmetric 8-bit grid (zero point 128) is that with
  ``q = code - 128`` and ``d = s``.

The one loss is the format's own: ``d`` and ``m`` are fp16 (ctp keeps fp32 scales), a relative
change of at most 2^-11 per block scale. Other grids (8-bit asymmetric, act-order ``g_idx``,
groups that are not multiples of 32) are refused in one line naming the formats that hold them.

Tensor names come from the ``gguf`` package's own map for the architecture; for Llama-style
models the query and key rows are permuted as llama.cpp's converter does (its rotary
embedding pairs dimensions differently), and the readers (llama.cpp, transformers) undo it.
Tokenizer metadata comes from the directory's tokenizer files (``gguf.SpecialVocab`` for the
special ids); ``tokenizer.ggml.pre`` is copied from the source GGUF when the model came from
one, else ``default``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ctp.compress.encoding import decode_codes
from ctp.errors import CTPError

log = logging.getLogger(__name__)

ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}  # HF model_type -> gguf MODEL_ARCH
BLOCK = 32
WORKS = "--format compressed-tensors or --format gptq hold it; GGUF takes grids of at most 4 bits (Q4_1) or " \
        "symmetric 8 bits (Q8_0) in groups of multiples of 32 without act-order"


def _qtype(entry: dict, name: str) -> str:
    if entry["kind"] == "sparse":
        raise CTPError(f"{name} is pruned but not quantized: GGUF export writes quantized models",
                       "export it with --format hf (dense safetensors)")
    cols = entry["shape"][1]
    group = cols if entry["n_groups"] == 1 else cols // entry["n_groups"]
    if entry["g_idx"]:
        raise CTPError(f"{name} uses act-order groups (a g_idx), which GGUF cannot hold", WORKS)
    if group % BLOCK:
        raise CTPError(f"{name} has groups of {group} columns, not a multiple of GGUF's blocks of {BLOCK}", WORKS)
    if entry["bits"] <= 4:
        return "Q4_1"
    if entry["bits"] == 8 and entry["sym"]:
        return "Q8_0"
    raise CTPError(f"{name} has a {entry['bits']}-bit {'symmetric' if entry['sym'] else 'asymmetric'} grid, which "
                   "no GGUF block type holds exactly", WORKS)


def _blocks(codes: Tensor, scale: Tensor, zero: Tensor, g_idx: Tensor, qtype: str) -> np.ndarray:
    """(rows, cols) codes with per-group grids -> (rows, cols/32 * bytes per block) uint8 GGUF blocks."""
    rows, cols = codes.shape
    nb = cols // BLOCK
    gb = g_idx[::BLOCK]  # (nb,) ctp group of each 32-block
    d = scale[:, gb].to(torch.float16).numpy()  # (rows, nb)
    c = codes.view(rows, nb, BLOCK).numpy().astype(np.uint8)
    if qtype == "Q4_1":
        m = (-scale[:, gb] * zero[:, gb]).to(torch.float16).numpy()  # (rows, nb)
        qs = c[..., :16] | (c[..., 16:] << 4)  # (rows, nb, 16): low nibbles weights 0-15, high 16-31
        blk = np.concatenate([d[..., None].view(np.uint8), m[..., None].view(np.uint8), qs], axis=-1)
    else:  # Q8_0
        q = (c.astype(np.int16) - 128).astype(np.int8).view(np.uint8)  # (rows, nb, 32)
        blk = np.concatenate([d[..., None].view(np.uint8), q], axis=-1)
    return np.ascontiguousarray(blk.reshape(rows, -1))


def _permute(t: Tensor, n_head: int, n_head_kv: int | None = None) -> Tensor:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py LlamaModel.permute) on dim 0 of ``t``."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _source_pre(meta: dict) -> str:
    """``tokenizer.ggml.pre`` of the GGUF the model came from (a named model), else 'default'."""
    spec = ((meta.get("source") or {}).get("spec")) or ""
    try:
        import gguf

        from ctp.models.load import NAMED_MODELS, _named_gguf

        if spec in NAMED_MODELS:
            field = gguf.GGUFReader(str(_named_gguf(spec))).fields.get("tokenizer.ggml.pre")
            if field is not None:
                return str(field.contents())
    except (OSError, ValueError, CTPError):
        pass
    return "default"


def _add_tokenizer(writer, src: Path, vocab_size: int, meta: dict) -> None:
    import gguf

    tj = json.loads((src / "tokenizer.json").read_text())
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise CTPError(f"the tokenizer of {src} is {model.get('type')!r}: the GGUF exporter writes byte-level BPE "
                       "(gpt2-style) tokenizers", "export it with --format hf or --format compressed-tensors")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for tok, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = tok, gguf.TokenType.NORMAL
    for added in tj.get("added_tokens") or []:
        i = added["id"]
        if i < vocab_size:
            tokens[i] = added["content"]
            types[i] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_source_pre(meta))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(src, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)


def export_gguf(src: Path, out: Path, dtype: torch.dtype | None = None) -> dict:
    """Write the ctp-compressed model ``src`` as the GGUF file ``out`` (atomically)."""
    import gguf

    from ctp.compress.artifact import read_payload

    meta, dense, comp, _ = read_payload(src)
    cfg = json.loads((src / "config.json").read_text())
    model_type = cfg.get("model_type")
    if model_type not in ARCHS:
        raise CTPError(f"GGUF export supports {', '.join(sorted(ARCHS))} models, not {model_type!r}",
                       "export it with --format compressed-tensors or --format hf")
    index = meta["tensors"]
    qtypes = {name: _qtype(e, name) for name, e in index.items()}  # every refusal before anything is written
    kinds = set(qtypes.values())
    layout = _Layout(gguf, cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[layout.arch])
        _add_hparams(writer, cfg, layout, str(meta.get("label") or src.name))
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1 if "Q4_1" in kinds else gguf.LlamaFileType.MOSTLY_Q8_0)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, src, layout.vocab, meta)
        for hf, t in sorted(dense.items()):
            if hf in (meta.get("aliases") or {}) or hf == "lm_head.weight" and cfg.get("tie_word_embeddings"):
                continue  # llama.cpp reads a tied output from token_embd
            if hf.endswith("rotary_emb.inv_freq"):
                continue
            arr = layout.permute(hf, t.float())
            half = arr.dim() == 2 and dtype == torch.float16  # matrices in fp16 when asked; vectors stay fp32
            writer.add_tensor(layout.name(hf), arr.to(torch.float16 if half else torch.float32).numpy())
        for name, entry in index.items():
            codes, scale, zero, g = decode_codes(name, entry, comp)
            codes, scale, zero = (layout.permute(name, x) for x in (codes, scale, zero))
            writer.add_tensor(layout.name(f"{name}.weight"), _blocks(codes, scale, zero, g, qtypes[name]),
                              raw_dtype=getattr(gguf.GGMLQuantizationType, qtypes[name]))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"format": "gguf", "block_types": sorted(kinds), "tensors": len(dense) + len(index),
            "bytes": out.stat().st_size}


class _Layout:
    """A model's shape as GGUF names it: tensor names from gguf's map, llama.cpp's q/k row order."""

    def __init__(self, gguf, cfg: dict):
        self.model_type = cfg["model_type"]
        self.arch = getattr(gguf.MODEL_ARCH, ARCHS[self.model_type])
        self.is_llama = self.arch == gguf.MODEL_ARCH.LLAMA
        self.n_layers = int(cfg["num_hidden_layers"])
        self.n_head = int(cfg["num_attention_heads"])
        self.n_kv = int(cfg.get("num_key_value_heads") or self.n_head)
        self.hidden = int(cfg["hidden_size"])
        self.head_dim = int(cfg.get("head_dim") or self.hidden // self.n_head)
        self.vocab = int(cfg["vocab_size"])
        self.rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
        self.tmap = gguf.get_tensor_name_map(self.arch, self.n_layers)

    def name(self, hf: str) -> str:
        name = self.tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise CTPError(f"no GGUF name for tensor {hf} of a {self.model_type} model",
                           "export it with --format compressed-tensors or --format hf")
        return name

    def permute(self, hf: str, t: Tensor) -> Tensor:
        """llama.cpp's rotary layout for Llama q/k rows (other architectures keep Hugging Face's)."""
        if self.is_llama and (hf.endswith("q_proj.weight") or hf.endswith("q_proj")):
            return _permute(t, self.n_head, self.n_head)
        if self.is_llama and (hf.endswith("k_proj.weight") or hf.endswith("k_proj")):
            return _permute(t, self.n_head, self.n_kv)
        return t


def _add_hparams(writer, cfg: dict, layout: _Layout, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(layout.hidden)
    writer.add_block_count(layout.n_layers)
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(layout.n_head)
    writer.add_head_count_kv(layout.n_kv)
    writer.add_rope_freq_base(float(layout.rope))
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_rope_dimension_count(layout.head_dim)
    writer.add_vocab_size(layout.vocab)


__all__ = ["export_gguf"]
