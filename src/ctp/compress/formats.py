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

from ctp.compress.artifact import (COMPRESSED_FILE, COMPRESSED_KIND, DENSE_FILE, DENSE_KIND, decode_codes,
                                   load_compressed, read_index)
from ctp.errors import CTPError
from ctp.io import atomic_dir, load_tensors

log = logging.getLogger(__name__)

FORMATS = ("compressed-tensors", "gptq", "gguf", "hf")


# --------------------------------------------------------------------------- reading a ctp artifact


def _artifact(src: Path) -> tuple[dict, dict[str, Tensor], dict[str, Tensor]]:
    meta = read_index(src)
    dense, _ = load_tensors(src / DENSE_FILE, kind=DENSE_KIND, what="dense weights")
    comp, _ = load_tensors(src / COMPRESSED_FILE, kind=COMPRESSED_KIND, what="compressed weights")
    return meta, dense, comp


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


def _compressed_tensors():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError as e:
        raise CTPError(f"the compressed-tensors format needs the compressed-tensors package ({e.name} is missing)",
                       "pip install compressed-tensors==0.20.1") from None
    return pack_to_int32, QuantizationArgs, QuantizationConfig, QuantizationScheme


def export_compressed_tensors(src: Path, tmp: Path, dtype: torch.dtype | None = None) -> dict:
    pack_to_int32, QuantizationArgs, QuantizationConfig, QuantizationScheme = _compressed_tensors()
    from safetensors.torch import save_file

    meta, dense, comp = _artifact(src)
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


def _pack_rows(q: Tensor, bits: int) -> Tensor:
    """Pack (n, m) codes along dim 0, 32/bits per int32, low bits first: (n / (32/bits), m) int32."""
    per = 32 // bits
    n, m = q.shape
    q = q.to(torch.int64).view(n // per, per, m)
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    packed = (q << shifts).sum(dim=1)  # (n/per, m) in [0, 2^32)
    return (packed - (packed >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def _unpack_rows(p: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`_pack_rows`: (n / (32/bits), m) int32 -> (n, m) int64 codes."""
    per = 32 // bits
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    q = (p.to(torch.int64).unsqueeze(1) >> shifts) & (2**bits - 1)  # (n/per, per, m)
    return q.reshape(-1, p.shape[1])


def export_gptq(src: Path, tmp: Path, dtype: torch.dtype | None = None) -> dict:
    from safetensors.torch import save_file

    meta, dense, comp = _artifact(src)
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
        tensors[f"{name}.qweight"] = _pack_rows(codes.T.contiguous(), bits)  # (in/per, out)
        tensors[f"{name}.qzeros"] = _pack_cols(zero.T.to(torch.int64) - 1, bits)  # (groups, out/per): z - 1
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


def _pack_cols(q: Tensor, bits: int) -> Tensor:
    """Pack (n, m) codes along dim 1, 32/bits per int32, low bits first: (n, m / (32/bits)) int32."""
    return _pack_rows(q.T.contiguous(), bits).T.contiguous()


def _unpack_cols(p: Tensor, bits: int) -> Tensor:
    return _unpack_rows(p.T.contiguous(), bits).T.contiguous()


# --------------------------------------------------------------------------- hf (dense)


def export_hf(src: Path, tmp: Path, dtype: torch.dtype | None = None) -> dict:
    model, tok, _ = load_compressed(src)
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(tmp)
    if tok is not None:
        tok.save_pretrained(tmp)
    return {"format": "hf", "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


# --------------------------------------------------------------------------- import


def quantization_config(path: Path) -> dict | None:
    """The ``quantization_config`` of a Hugging Face directory's config.json (None when it has none)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    q = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return q if isinstance(q, dict) else None


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
    from ctp.compress.artifact import encode_weight
    from ctp.compress.registry import CompressedWeight

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
        codes = _unpack_rows(raw[f"{name}.qweight"], bits).T.contiguous()  # (out, in)
        scale = raw[f"{name}.scales"].float().T.contiguous()  # (out, groups)
        zero = _unpack_cols(raw[f"{name}.qzeros"], bits).T.float()  # (out, groups)
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


__all__ = ["FORMATS", "export_model", "quantization_config", "read_foreign"]
