"""Checkpoints quantized by other tools (compressed-tensors, GPTQ), read into ctp's own encoding.

:func:`read_foreign` returns what a ctp artifact holds (index, dense tensors, compressed tensors),
so :func:`ctp.compress.artifact.load_compressed` runs such a model dense or packed like its own.
The format descriptions are in :mod:`ctp.compress.formats`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from ctp.compress.encoding import encode_weight, unpack_cols, unpack_rows
from ctp.compress.weight import CompressedWeight
from ctp.errors import CTPError
from ctp.models.names import quantization_config


def _compressed_tensors():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError as e:
        raise CTPError(f"the compressed-tensors format needs the compressed-tensors package ({e.name} is missing)",
                       "pip install compressed-tensors==0.20.1") from None
    return pack_to_int32, QuantizationArgs, QuantizationConfig, QuantizationScheme


def _checkpoint_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CTPError(f"{path} holds no .safetensors weights", "pass a checkpoint saved in safetensors")
    tensors: dict[str, Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise CTPError(f"cannot read {f}: {str(e).splitlines()[0]}", "the checkpoint is damaged: download it "
                                                                         "again") from e
    return tensors


def _encode(name: str, codes: Tensor, scale: Tensor, zero: Tensor, g_idx: Tensor | None, bits: int, sym: bool,
            bias_dtype=None) -> tuple[dict[str, Tensor], dict]:
    rows, cols = codes.shape
    cw = CompressedWeight(weight=torch.empty(rows, cols, device="meta"), codes=codes.to(torch.uint8),
                          scale=scale.float(), zero=zero.float(), g_idx=g_idx, bits=bits, sym=sym)
    tensors, entry = encode_weight(name, cw, torch.float32)
    entry["layout"] = "linear"
    return tensors, entry


def _foreign_meta(fmt: str, index: dict, dense: dict[str, Tensor], label: str, qcfg: dict) -> dict:
    dtypes = {t.dtype for t in dense.values() if t.is_floating_point()}
    names = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    return {"format_version": None, "config": None, "label": label, "imported": {"format": fmt, "config": qcfg},
            "source": None, "summary": None, "aliases": {}, "tensors": index,
            "storage": {"dense_dtype": names.get(dtypes.pop() if len(dtypes) == 1 else torch.float32, "float32")}}


def read_compressed_tensors(path: Path, qcfg: dict) -> tuple[dict, dict[str, Tensor], dict[str, Tensor]]:
    """A pack-quantized compressed-tensors checkpoint in ctp's encoding: (meta, dense tensors, compressed tensors)."""
    _compressed_tensors()
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    fmt = qcfg.get("format")
    works = "ctp reads pack-quantized integer weights (llm-compressor's W4A16 / W8A16 schemes)"
    if fmt != "pack-quantized":
        raise CTPError(f"{path} is a compressed-tensors checkpoint in format {fmt!r}", works)
    groups = [g for g in (qcfg.get("config_groups") or {}).values() if isinstance(g, dict)]
    weights = [g.get("weights") or {} for g in groups]
    if len(weights) != 1 or weights[0].get("type", "int") != "int" or g_input(groups[0]):
        raise CTPError(f"{path} has {len(weights)} quantization schemes or quantized activations", works)
    w = weights[0]
    bits, sym = int(w.get("num_bits", 8)), bool(w.get("symmetric", True))
    if not 1 <= bits <= 8:
        raise CTPError(f"{path} has {bits}-bit weights", works)
    half = 2 ** (bits - 1)
    raw = _checkpoint_tensors(path)
    index: dict[str, dict] = {}
    comp: dict[str, Tensor] = {}
    names = sorted(k[: -len(".weight_packed")] for k in raw if k.endswith(".weight_packed"))
    if not names:
        raise CTPError(f"{path} declares compressed-tensors quantization but holds no weight_packed tensors",
                       "the checkpoint is incomplete: download it again")
    used = set()
    for name in names:
        shape = tuple(int(v) for v in raw[f"{name}.weight_shape"].tolist())
        q = unpack_from_int32(raw[f"{name}.weight_packed"], bits, torch.Size(shape))  # (out, in) signed
        scale = raw[f"{name}.weight_scale"].float()
        scale = scale.reshape(shape[0], -1)  # (out, groups); per-channel scales come as (out, 1)
        if sym:
            zero = torch.full_like(scale, half)
        else:
            zp = unpack_from_int32(raw[f"{name}.weight_zero_point"], bits, torch.Size(scale.shape), packed_dim=0)
            zero = zp.float() + half
        g = raw.get(f"{name}.weight_g_idx")
        tensors, entry = _encode(name, (q.to(torch.int16) + half).to(torch.uint8), scale, zero,
                                 None if g is None else g.long(), bits, sym)
        comp.update(tensors)
        index[name] = entry
        used |= {f"{name}.{k}" for k in ("weight_packed", "weight_shape", "weight_scale", "weight_zero_point",
                                         "weight_g_idx")}
    dense = {k: v for k, v in raw.items() if k not in used}
    group = w.get("group_size") or -1
    label = f"compressed-tensors:int{bits}" + ("" if group in (-1, None) else f"g{group}") + ("-sym" if sym else "")
    return _foreign_meta("compressed-tensors", index, dense, label, qcfg), dense, comp


def g_input(group: dict) -> bool:
    """Whether a compressed-tensors scheme also quantizes activations (ctp runs weight-only grids)."""
    return bool(group.get("input_activations"))


def read_gptq(path: Path, qcfg: dict) -> tuple[dict, dict[str, Tensor], dict[str, Tensor]]:
    """A GPTQ checkpoint (AutoGPTQ / GPTQModel, v1 or v2 zero points) in ctp's encoding."""
    if (path / "quantize_config.json").is_file():
        try:
            qcfg = {**json.loads((path / "quantize_config.json").read_text()), **qcfg}
        except ValueError:
            pass
    bits = int(qcfg.get("bits", 4))
    if 32 % bits:
        raise CTPError(f"{path} is a {bits}-bit GPTQ checkpoint: ctp reads 2, 4 and 8 bits",
                       "quantize the model with 2, 4 or 8 bits")
    v2 = str(qcfg.get("checkpoint_format", "gptq")).lower() == "gptq_v2"
    sym = bool(qcfg.get("sym", True))
    raw = _checkpoint_tensors(path)
    names = sorted(k[: -len(".qweight")] for k in raw if k.endswith(".qweight"))
    if not names:
        raise CTPError(f"{path} declares GPTQ quantization but holds no qweight tensors",
                       "the checkpoint is incomplete: download it again")
    index: dict[str, dict] = {}
    comp: dict[str, Tensor] = {}
    used = set()
    for name in names:
        codes = unpack_rows(raw[f"{name}.qweight"], bits).T.contiguous()  # (out, in)
        scale = raw[f"{name}.scales"].float().T.contiguous()  # (out, groups)
        zero = unpack_cols(raw[f"{name}.qzeros"], bits).T.float()  # (out, groups)
        if not v2:
            zero = zero + 1  # v1 stores zero points minus one
        if codes.shape[0] != scale.shape[0]:
            raise CTPError(f"{name}: qweight has {codes.shape[0]} outputs, scales {scale.shape[0]}",
                           "the checkpoint is damaged: download it again")
        g = raw.get(f"{name}.g_idx")
        g = (torch.arange(codes.shape[1]) // (codes.shape[1] // scale.shape[1])) if g is None else g.long()
        if int(g.max()) >= scale.shape[1]:
            raise CTPError(f"{name}: g_idx names group {int(g.max())} of {scale.shape[1]}",
                           "the checkpoint's group size does not match its tensors: download it again")
        if bool((zero > 2**bits - 1).any()):
            raise CTPError(f"{name}: a zero point exceeds {2**bits - 1}", "the checkpoint is damaged")
        tensors, entry = _encode(name, codes, scale, zero, g, bits, sym)
        comp.update(tensors)
        index[name] = entry
        used |= {f"{name}.{k}" for k in ("qweight", "qzeros", "scales", "g_idx")}
    dense = {k: v for k, v in raw.items() if k not in used}
    group = int(qcfg.get("group_size", -1))
    label = f"gptq:int{bits}" + ("" if group == -1 else f"g{group}") + ("-sym" if sym else "")
    return _foreign_meta("gptq", index, dense, label, qcfg), dense, comp


def read_foreign(path: str | Path) -> tuple[dict, dict[str, Tensor], dict[str, Tensor]]:
    """A checkpoint quantized by another tool (compressed-tensors or GPTQ) as (meta, dense, compressed) in
    ctp's artifact encoding, so that ctp runs it dense or packed like its own."""
    path = Path(path)
    qcfg = quantization_config(path)
    method = (qcfg or {}).get("quant_method")
    if method == "compressed-tensors":
        return read_compressed_tensors(path, qcfg)
    if method == "gptq":
        return read_gptq(path, qcfg)
    raise CTPError(f"{path} has quantization method {method!r}, which ctp does not read",
                   "pass a ctp-compressed model, a compressed-tensors (pack-quantized) or GPTQ checkpoint, "
                   "or a dense model")


__all__ = ["quantization_config", "read_foreign"]
