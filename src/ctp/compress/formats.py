"""Other tools' formats for ctp's compressed models: export, and import of checkpoints made elsewhere.

One home for the mapping between ctp's codes and each format's. ctp stores, per linear,
unsigned codes ``q`` in ``[0, 2^bits)``, fp32 scales ``s`` and integer zero points ``z`` per
(row, group), and a weight ``s * (q - z)`` (:mod:`ctp.compress.artifact`). Formats:

``compressed-tensors``  what llm-compressor writes and vLLM serves ("pack-quantized"): signed
    codes ``q - 2^(bits-1)`` packed into int32 by the ``compressed-tensors`` package's own
    ``pack_to_int32``, ``weight_scale`` (rows, groups), ``weight_zero_point`` (asymmetric
    grids, packed along rows), ``weight_shape``; the scheme in ``config.json`` is built with
    the package's ``QuantizationConfig``. Exact: scales stay in the dense dtype (fp32 by
    default). Act-order groupings (a ``g_idx``) are refused: the format no longer reads one.
``gptq``  the AutoGPTQ / GPTQModel checkpoint ("gptq" v1 format that transformers, optimum and
    vLLM read): ``qweight`` int32 (in/(32/bits), out) with codes packed along the input,
    ``qzeros`` int32 (groups, out/(32/bits)) holding ``z - 1`` (the v1 convention), ``scales``
    fp16 (groups, out), ``g_idx`` int32 (in,), ``quantize_config.json``. Scales round to fp16
    (the format's dtype). 2, 4 and 8 bits (codes that tile an int32); a zero point of 0
    cannot be written in v1 and is refused.
``gguf``  llama.cpp: 4-bit asymmetric groups of 32 -> Q4_1, 8-bit symmetric groups of 32 ->
    Q8_0 (block scales and minima in fp16, as the format stores them); see :mod:`ctp.compress.gguf_export`.
``hf``  the dense rebuild as a plain Hugging Face directory (safetensors), for every tool.

Every export writes into a temporary sibling and renames it when complete
(:func:`ctp.io.atomic_dir`), and every refusal is one line naming the format that works.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import Tensor

from ctp.compress.artifact import load_compressed, read_index, read_payload
from ctp.compress.encoding import decode_codes, pack_cols, pack_rows
from ctp.compress.foreign import _compressed_tensors
from ctp.errors import CTPError
from ctp.io import atomic_dir

log = logging.getLogger(__name__)

FORMATS = ("compressed-tensors", "gptq", "gguf", "hf")


# --------------------------------------------------------------------------- reading a ctp artifact


def _grid(index: dict[str, dict], fmt: str, works: str) -> dict:
    """The one quantization grid every compressed linear shares (ctp applies one recipe), checked for ``fmt``."""
    kinds = {e["kind"] for e in index.values()}
    if kinds == {"sparse"}:
        raise CTPError(f"the model is pruned but not quantized: {fmt} stores quantized weights only",
                       "export it with --format hf (dense safetensors)")
    grids = {(e["bits"], e["sym"]) for e in index.values() if e["kind"] != "sparse"}
    if len(grids) != 1 or "sparse" in kinds:
        raise CTPError(f"the model mixes quantization grids {sorted(grids)}: {fmt} takes one", works)
    bits, sym = grids.pop()
    return {"bits": bits, "sym": sym}


def _group_size(entry: dict) -> int:
    """Input columns per group, -1 for one grid per row."""
    cols = entry["shape"][1]
    return -1 if entry["n_groups"] == 1 else cols // entry["n_groups"]


def _check_linear_layout(index: dict[str, dict], fmt: str) -> None:
    conv = [n for n, e in index.items() if e.get("layout") == "conv1d"]
    if conv:
        raise CTPError(f"{conv[0]} is a GPT-2 Conv1D layer: {fmt} quantizes nn.Linear modules only",
                       "export it with --format hf (dense safetensors)")


def _write_common(tmp: Path, src: Path, quantization_config: dict | None) -> None:
    """config.json (with ``quantization_config``), generation config and tokenizer files of ``src``."""
    import shutil

    cfg = json.loads((src / "config.json").read_text())
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    for f in src.iterdir():
        if f.is_file() and f.name not in ("config.json",) and (
                f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template"))
                or f.name in ("vocab.json", "merges.txt")):
            shutil.copy2(f, tmp / f.name)


# --------------------------------------------------------------------------- compressed-tensors


def export_compressed_tensors(src: Path, tmp: Path, dtype: torch.dtype | None = None) -> dict:
    pack_to_int32, QuantizationArgs, QuantizationConfig, QuantizationScheme = _compressed_tensors()
    from safetensors.torch import save_file

    meta, dense, comp, _ = read_payload(src)
    index = meta["tensors"]
    works = "export it with --format hf (dense safetensors)"
    grid = _grid(index, "compressed-tensors", works)
    _check_linear_layout(index, "compressed-tensors")
    if any(e["g_idx"] for e in index.values()):
        raise CTPError("the model was quantized with act-order groups (a g_idx): compressed-tensors 0.20 reads no "
                       "g_idx", "export it with --format gptq (which keeps g_idx), or re-compress without --act-order")
    sizes = {_group_size(e) for e in index.values()}
    if len(sizes) != 1:
        raise CTPError(f"the linears have different group sizes {sorted(sizes)}: one scheme cannot describe them",
                       works)
    group = sizes.pop()
    bits, sym = grid["bits"], grid["sym"]
    half = 2 ** (bits - 1)
    dtype = dtype or next((t.dtype for t in dense.values() if t.is_floating_point()), torch.float32)
    tensors: dict[str, Tensor] = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in dense.items()}
    for name, entry in index.items():
        codes, scale, zero, _ = decode_codes(name, entry, comp)  # (out, in) uint8, (out, groups) fp32 x2
        tensors[f"{name}.weight_packed"] = pack_to_int32((codes.to(torch.int16) - half).to(torch.int8), bits)
        tensors[f"{name}.weight_scale"] = scale.to(dtype).contiguous()
        tensors[f"{name}.weight_shape"] = torch.tensor(entry["shape"], dtype=torch.int64)
        if not sym:
            zp = (zero.to(torch.int16) - half).to(torch.int8)  # (out, groups) signed
            tensors[f"{name}.weight_zero_point"] = pack_to_int32(zp, bits, packed_dim=0).contiguous()
    for alias in meta.get("aliases", {}):  # tied weights are stored once; the config re-ties them
        tensors.pop(alias, None)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="channel" if group == -1 else "group",
                            group_size=None if group == -1 else group, dynamic=False)
    ignore = sorted(_ignored_linears(src, index))
    qcfg = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                              format="pack-quantized", quantization_status="compressed", ignore=ignore)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    _write_common(tmp, src, qcfg.to_dict())
    return {"format": "compressed-tensors", "bits": bits, "group_size": group, "symmetric": sym,
            "dtype": str(dtype).removeprefix("torch."), "linears": len(index)}


def _ignored_linears(src: Path, index: dict[str, dict]) -> set[str]:
    """Names of the model's nn.Linear modules that are not quantized (the LM head, usually)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in index}


# --------------------------------------------------------------------------- GPTQ


def export_gptq(src: Path, tmp: Path, dtype: torch.dtype | None = None) -> dict:
    from safetensors.torch import save_file

    meta, dense, comp, _ = read_payload(src)
    index = meta["tensors"]
    works = "export it with --format compressed-tensors, or --format hf (dense safetensors)"
    grid = _grid(index, "gptq", works)
    _check_linear_layout(index, "gptq")
    bits, sym = grid["bits"], grid["sym"]
    if 32 % bits:
        raise CTPError(f"{bits}-bit codes do not tile an int32: this exporter writes GPTQ 2, 4 and 8 bits",
                       "export it with --format compressed-tensors")
    sizes = {_group_size(e) for e in index.values()}
    if len(sizes) != 1:
        raise CTPError(f"the linears have different group sizes {sorted(sizes)}: GPTQ takes one", works)
    group = sizes.pop()
    per = 32 // bits
    dtype = dtype or torch.float16
    tensors: dict[str, Tensor] = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in dense.items()}
    desc_act = False
    for name, entry in index.items():
        rows, cols = entry["shape"]
        if rows % per or cols % per:
            raise CTPError(f"{name} has shape {rows}x{cols}: GPTQ packs {per} codes per int32", works)
        codes, scale, zero, g = decode_codes(name, entry, comp)
        if bool((zero == 0).any()):
            raise CTPError(f"{name} has a zero point of 0, which the GPTQ v1 format (zeros stored minus one) "
                           "cannot hold", works)
        desc_act |= bool(entry["g_idx"])
        tensors[f"{name}.qweight"] = pack_rows(codes.T.contiguous(), bits)  # (in/per, out)
        tensors[f"{name}.qzeros"] = pack_cols(zero.T.to(torch.int64) - 1, bits)  # (groups, out/per): z - 1
        tensors[f"{name}.scales"] = scale.T.to(dtype).contiguous()  # (groups, out)
        tensors[f"{name}.g_idx"] = g.to(torch.int32).contiguous()  # (in,)
        bias = tensors.pop(f"{name}.bias", None)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.to(dtype)
    for alias in meta.get("aliases", {}):
        tensors.pop(alias, None)
    qcfg = {"bits": bits, "group_size": group, "desc_act": desc_act, "sym": sym, "true_sequential": True,
            "damp_percent": 0.01, "static_groups": False, "checkpoint_format": "gptq", "quant_method": "gptq",
            "meta": {"quantizer": ["ctp"]}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
    _write_common(tmp, src, qcfg)
    return {"format": "gptq", "bits": bits, "group_size": group, "symmetric": sym, "desc_act": desc_act,
            "linears": len(index)}


# --------------------------------------------------------------------------- hf (dense)


def export_hf(src: Path, tmp: Path, dtype: torch.dtype | None = None) -> dict:
    model, tok, _ = load_compressed(src)
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(tmp)
    if tok is not None:
        tok.save_pretrained(tmp)
    return {"format": "hf", "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


# --------------------------------------------------------------------------- entry point


def export_model(src: str | Path, out: str | Path, fmt: str, dtype: torch.dtype | None = None) -> dict:
    """Write the ctp-compressed model ``src`` to ``out`` in format ``fmt`` (one of :data:`FORMATS`).

    Checks happen before anything is written; ``out`` appears only when complete.
    """
    src, out = Path(src), Path(out)
    if fmt not in FORMATS:
        raise CTPError(f"unknown export format {fmt!r}", f"use one of: {', '.join(FORMATS)}")
    read_index(src)  # a ctp artifact, checked, before anything is written
    if fmt == "gguf":
        from ctp.compress.gguf_export import export_gguf

        return export_gguf(src, out, dtype)
    writer = {"compressed-tensors": export_compressed_tensors, "gptq": export_gptq, "hf": export_hf}[fmt]
    with atomic_dir(out) as tmp:
        summary = writer(src, tmp, dtype)
    summary["bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log.info("exported %s as %s to %s (%.1f MB)", src, fmt, out, summary["bytes"] / 1e6)
    return summary


__all__ = ["FORMATS", "export_model"]
