"""The compressed-model artifact: a directory that really is smaller, and rebuilds bit-exactly.

Layout (written atomically with :func:`ctp.io.atomic_dir`)::

    DIR/
      config.json                 the Hugging Face model config (plus generation_config.json if any)
      tokenizer files             tokenizer.save_pretrained
      ctp_compression.json        format version, CompressConfig, summary, storage sizes, tensor index
      dense.safetensors           every tensor that was not compressed (embeddings, norms, head, biases)
      compressed.safetensors      the compressed linear layers, packed (see below)
      compression_report.json     the full per-layer report, when a CompressionReport was given

Each compressed linear ``NAME`` (full module name; matrices are (out, in) whatever the
module's layout, GPT-2's Conv1D included) is stored as one of three *kinds*:

``quant``        ``NAME.codes``: every code, ``bits`` bits each (``pack_int``, row-major).
``sparse_quant`` ``NAME.codes``: the codes of the *kept* weights only, in row-major order of
                 the mask, ``bits`` bits each, plus ``NAME.mask`` (``pack_mask``, 1 bit per
                 weight). 50% sparse + 4-bit thus costs 0.5 * 4 + 1 = 3 bits per weight.
``sparse``       ``NAME.values``: the kept weights in the dense dtype, plus ``NAME.mask``.

Quantized kinds also hold ``NAME.scale`` (out, n_groups) **fp32**, ``NAME.zero`` (the integer
zero points, packed at ``bits`` bits) and ``NAME.g_idx`` (int16/int32 group of each input
column) only when act-order makes it differ from contiguous groups. Scales stay fp32
because the kernels compute the in-memory weights from fp32 scales; storing them rounded
to fp16 would change the weights (by up to ~5e-4 relative) and break the bit-exact
rebuild. At group size 128 this costs 0.25 bit per weight (fp16 would save 0.125); with
per-row grids it is negligible. N:M masks are stored as plain bitmasks (1 bit per weight);
an index encoding (2 bits per kept weight for 2:4) would be a possible improvement.

The rebuilt fp32 matrix ``dequantize(codes, scale[:, g_idx], zero[:, g_idx]) * mask`` is cast
to the module's dtype exactly as the compression kernels cast it, so a model loaded from
the artifact gives the same logits, bit for bit, as the in-memory compressed model
(when the dense part is stored in the model's own dtype, the default). ``save_compressed``
checks the rebuild against the live weights before writing anything.

Dense tensors that share storage (tied embeddings: SmolLM2's LM head is its token
embedding) are stored once and re-tied on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from ctp.compress.config import ALGORITHM_VERSION, CompressConfig
from ctp.compress.encoding import decode_codes, decode_mask, decode_weight, encode_weight
from ctp.compress.weight import CompressedWeight
from ctp.compress.report import CompressionReport
from ctp.errors import CTPError, require
from ctp.io import (atomic_dir, atomic_write_json, load_tensors, read_json, release_memory, save_tensors,
                    save_tensors_streaming)
from ctp.models.adapter import set_weight_matrix, weight_matrix
from ctp.models.names import COMPRESSED_MARKER

log = logging.getLogger(__name__)

MARKER = COMPRESSED_MARKER
FORMAT_VERSION = 1
DENSE_FILE = "dense.safetensors"
COMPRESSED_FILE = "compressed.safetensors"
REPORT_FILE = "compression_report.json"
DENSE_KIND = "ctp-compressed-dense"
COMPRESSED_KIND = "ctp-compressed-linears"

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


# --------------------------------------------------------------------------- encoding


# --------------------------------------------------------------------------- save


@torch.no_grad()
def default_dense_dtype(model: nn.Module, source=None) -> torch.dtype:
    """The dtype ``ctp compress`` stores an fp32 model's uncompressed tensors in: float16, or bfloat16 when a value
    would overflow float16. Measured on SmolLM2-135M (bench/README.md): storing them in float16 moved the c4 test
    perplexity of its 4-bit and 50% + 4-bit artifacts by less than 0.002% (20,440 tokens), for half the bytes.
    Tensors still on the meta device are read from ``source`` (:class:`ctp.models.shards.BlockSource`, whose
    one scan also gives the compression's cache key)."""
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        return dtype
    if source is not None:  # one pass over the checkpoint, shared with the compression's cache key
        big = source.scan(model)[1]
    else:
        big = max((float(t.abs().max()) for t in model.state_dict().values() if t.is_floating_point() and t.numel()),
                  default=0.0)
    return torch.float16 if big < torch.finfo(torch.float16).max else torch.bfloat16



def _aliases(model: nn.Module) -> dict[str, str]:
    """State-dict keys that share storage with an earlier key: {alias: kept key}."""
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        # a tensor left on the meta device (read from the checkpoint when written) is tied by being the same one
        sig = ("meta", id(t)) if t.is_meta else (t.device, t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and sig in seen:
            aliases[key] = seen[sig]
        else:
            seen[sig] = key
    return aliases


def _nbytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def save_compressed(
    model: nn.Module,
    tokenizer,
    report_or_cfg,
    compressed: dict[str, CompressedWeight] | str | Path | None = None,
    out_dir: str | Path | None = None,
    *,
    dense_dtype: torch.dtype | None = None,
    source: dict | None = None,
    encoded=None,
) -> dict:
    """Write the compressed ``model`` as an artifact directory; returns its storage summary.

    ``report_or_cfg`` is a :class:`~ctp.compress.report.CompressionReport` (its config,
    summary and full report are recorded) or a :class:`CompressConfig`. ``compressed``
    maps full module names to what :func:`~ctp.compress.driver.compress_model` produced
    (default: the report's ``compressed``; ``save_compressed(model, tok, report, out_dir)``
    works too); the live module weights must equal their rebuild (checked). ``dense_dtype``
    (default: the model's dtype) stores the uncompressed tensors and pruned-only values
    in another precision; then the loaded model matches the in-memory one cast to it.
    ``source`` (e.g. ``ModelInfo.to_dict()``) records where the model came from. ``encoded``
    (:class:`ctp.compress.spill.EncodedBlocks`, the payloads a larger-than-memory run wrote to disk, in
    ``dense_dtype``) is streamed into the artifact one tensor at a time instead of encoding ``compressed``.
    """
    if out_dir is None and isinstance(compressed, (str, Path)):
        compressed, out_dir = None, compressed
    if out_dir is None:
        raise TypeError("save_compressed needs out_dir")
    report, cfg_dict, compressed = _recipe_of(report_or_cfg, compressed)
    model_dtype = next(model.parameters()).dtype
    dense_dtype = dense_dtype or model_dtype
    if dense_dtype not in _DTYPE_NAMES:
        raise CTPError(f"cannot store weights as {dense_dtype}", "use float32, float16 or bfloat16")

    if encoded is not None:
        require(encoded.value_dtype == dense_dtype, f"the spilled payloads are {encoded.value_dtype}, not {dense_dtype}",
                "save with the dtype the run encoded")
        comp_tensors, index = {}, dict(encoded.entries)
    else:
        comp_tensors, index = _encode_linears(model, compressed, dense_dtype, check=dense_dtype == model_dtype)
    aliases = _aliases(model)
    skip = {f"{name}.weight" for name in index} | set(aliases)
    state = {k: v for k, v in model.state_dict().items() if k not in skip}
    checkpoint = encoded.source if encoded is not None else None  # where a released tensor (an untied head) is read

    def dense_read(k: str) -> Tensor:  # one tensor at a time, in the stored dtype
        t = state[k]
        if t.is_meta:
            require(checkpoint is not None, f"{k} was released and no checkpoint can give it back",
                    "save a model whose weights are all in memory")
            t = checkpoint.read(k, dense_dtype)
        return t.detach().cpu().to(dense_dtype) if t.is_floating_point() else t.detach().cpu()

    dense_size = torch.empty((), dtype=dense_dtype).element_size()
    dense_bytes = sum(t.numel() * (dense_size if t.is_floating_point() else t.element_size()) for t in state.values())
    storage = _storage(model, index, encoded.nbytes if encoded is not None else _nbytes(comp_tensors), dense_bytes,
                       dense_dtype)
    meta = {"format_version": FORMAT_VERSION, "algorithm_version": ALGORITHM_VERSION, "config": cfg_dict,
            "label": CompressConfig.from_dict(cfg_dict).label(),
            "summary": report.summary() if report is not None else None, "source": source, "storage": storage,
            "tokenizer": tokenizer is not None, "aliases": aliases, "tensors": index}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        _save_config_files(tmp, model, tokenizer)
        save_tensors_streaming(tmp / DENSE_FILE, list(state), dense_read, {"dtype": storage["dense_dtype"]},
                               kind=DENSE_KIND)
        if encoded is not None:
            save_tensors_streaming(tmp / COMPRESSED_FILE, encoded.names(), encoded.read,
                                   {"format_version": FORMAT_VERSION}, kind=COMPRESSED_KIND)
        else:
            save_tensors(tmp / COMPRESSED_FILE, comp_tensors, {"format_version": FORMAT_VERSION}, kind=COMPRESSED_KIND)
        if report is not None:
            atomic_write_json(tmp / REPORT_FILE, report.to_dict())
        sizes = {f.name: f.stat().st_size for f in tmp.iterdir() if f.is_file()}
        storage["file_bytes"] = sizes
        storage["weights_file_bytes"] = sizes[DENSE_FILE] + sizes[COMPRESSED_FILE]
        storage["total_bytes"] = sum(sizes.values())
        # every other file is covered: the safetensors by their own digests, the JSON files here
        meta["files_sha256"] = {f.name: _file_sha256(f) for f in sorted(tmp.iterdir())
                                if f.is_file() and not f.name.endswith(".safetensors")}
        meta["index_sha256"] = _index_digest(meta)
        atomic_write_json(tmp / MARKER, meta)
    log.info("wrote %s: %.1f MB of weights (%.2f bits per compressed weight)", out_dir,
             storage["weights_file_bytes"] / 1e6, storage["linear_bits_per_weight"])
    return storage


def _recipe_of(report_or_cfg, compressed) -> tuple[CompressionReport | None, dict, dict[str, CompressedWeight]]:
    """(report or None, recipe dict, compressed weights) from save_compressed's arguments."""
    if isinstance(report_or_cfg, CompressionReport):
        report, cfg_dict = report_or_cfg, report_or_cfg.config
        if compressed is None:
            compressed = report.compressed
    elif isinstance(report_or_cfg, CompressConfig):
        report, cfg_dict = None, report_or_cfg.to_dict()
    else:
        raise TypeError("report_or_cfg must be a CompressionReport or a CompressConfig")
    if not compressed:
        raise ValueError("nothing was compressed")
    return report, cfg_dict, compressed


def _encode_linears(model: nn.Module, compressed: dict[str, CompressedWeight], dense_dtype: torch.dtype,
                    check: bool) -> tuple[dict[str, Tensor], dict[str, dict]]:
    """(payload tensors, index entries) of every compressed linear; with ``check``, each payload must rebuild
    the live weight exactly."""
    modules = dict(model.named_modules())
    comp_tensors: dict[str, Tensor] = {}
    index: dict[str, dict] = {}
    for name, cw in compressed.items():
        if name not in modules:
            raise ValueError(f"{name} is not a module of the model")
        mod = modules[name]
        live = weight_matrix(mod).detach().cpu()
        tensors, entry = encode_weight(name, cw, dense_dtype)
        entry["layout"] = "conv1d" if type(mod).__name__ == "Conv1D" else "linear"
        # -0.0 and +0.0 compare equal here: pruned weights may carry either sign of zero.
        if check and not torch.equal(decode_weight(name, entry, tensors).to(live.dtype), live):
            raise RuntimeError(f"{name}: the stored payload does not rebuild the model's weight")
        comp_tensors.update(tensors)
        index[name] = entry
    return comp_tensors, index


def _storage(model: nn.Module, index: dict[str, dict], comp_bytes: int, dense_bytes: int,
             dense_dtype: torch.dtype) -> dict:
    """The artifact's size summary (file sizes are added once written)."""
    model_dtype = next(model.parameters()).dtype
    linear_params = sum(math.prod(e["shape"]) for e in index.values())
    n_params = sum(p.numel() for p in model.parameters())  # parameters() yields tied ones once
    return {
        "dense_dtype": _DTYPE_NAMES[dense_dtype],
        "model_dtype": _DTYPE_NAMES.get(model_dtype, str(model_dtype)),
        "n_params": n_params,
        "linear_params": linear_params,
        "compressed_linear_bytes": comp_bytes,  # tensor payload of compressed.safetensors
        "dense_bytes": dense_bytes,
        "linear_fp16_bytes": 2 * linear_params,
        "linear_bits_per_weight": 8 * comp_bytes / linear_params,
        "fp16_bytes": 2 * n_params,
        "original_bytes": n_params * torch.empty((), dtype=model_dtype).element_size(),
    }


def _save_config_files(tmp: Path, model: nn.Module, tokenizer) -> None:
    """config.json, generation_config.json (when valid) and the tokenizer files."""
    model.config.save_pretrained(tmp)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(tmp)
        except (ValueError, OSError) as e:  # an invalid generation config must not sink the artifact
            log.warning("generation config not saved: %s", e)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def estimate_bytes(model: nn.Module, cfg: CompressConfig, dense_dtype: torch.dtype) -> int:
    """An upper estimate of the artifact's size before compressing: the decoder linears at the recipe's bits per
    weight (codes, 1-bit mask, fp32 scales per group), everything else at ``dense_dtype``."""
    from ctp.models.adapter import decoder_layers, linear_layers, weight_matrix

    linear = sum(weight_matrix(m).numel() for layer in decoder_layers(model) for m in linear_layers(layer).values())
    total = sum(p.numel() for p in model.parameters())
    bits = 0.0
    if cfg.quant is not None:
        group = cfg.quant.group_size if cfg.quant.group_size and cfg.quant.group_size > 0 else 4096
        bits = cfg.quant.bits + 2 * 32 / group  # codes, plus a scale and a zero point per group
    if cfg.prune is not None:
        bits = 1 + (bits or 8 * torch.empty((), dtype=dense_dtype).element_size())  # mask + kept values (at most all)
    dense_bytes = torch.empty((), dtype=dense_dtype).element_size()
    return int(linear * bits / 8 + (total - linear) * dense_bytes) + (1 << 20)


# --------------------------------------------------------------------------- load


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _index_digest(meta: dict) -> str:
    """SHA-256 of the index itself (all but this digest), so an edited recipe or label is noticed."""
    body = {k: v for k, v in meta.items() if k != "index_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _verify_index(path: Path, meta: dict) -> None:
    """Check the index's own digest and those of the metadata files it lists (artifacts from before they existed
    carry none and are accepted as they are)."""
    fix = "the artifact was modified or damaged: recreate it with ctp compress"
    if "index_sha256" in meta and meta["index_sha256"] != _index_digest(meta):
        raise CTPError(f"{path / MARKER} was modified after it was written (checksum mismatch)", fix)
    for name, digest in (meta.get("files_sha256") or {}).items():
        f = path / name
        if not f.is_file():
            raise CTPError(f"{f} is missing from the compressed model", fix)
        if _file_sha256(f) != digest:
            raise CTPError(f"{f} was modified after the compressed model was written (checksum mismatch)", fix)


def read_index(path: str | Path) -> dict:
    """The validated ``ctp_compression.json`` of an artifact directory."""
    meta = read_json(Path(path) / MARKER, "compression index")
    if not isinstance(meta, dict):
        raise CTPError(f"{Path(path) / MARKER} does not hold a mapping", "the artifact is damaged: recreate it")
    _verify_index(Path(path), meta)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CTPError(f"{path} has compressed-model format {meta.get('format_version')!r}, expected {FORMAT_VERSION}",
                       "recreate it with this version of ctp")
    for key in ("config", "tensors", "storage"):
        if key not in meta:
            raise CTPError(f"{Path(path) / MARKER} lacks '{key}'", "the artifact is damaged: recreate it")
    return meta


def load_compressed(path: str | Path, dtype: torch.dtype = torch.float32, runtime: str = "dense",
                    device: str | torch.device = "cpu", act_dtype: torch.dtype | None = None,
                    embeddings: str = "dense"):
    """Rebuild ``(model, tokenizer, compression)`` from an artifact directory.

    The model is built from its config without weight memory, the dense tensors are
    loaded, each compressed linear is rebuilt from its packed payload and tied weights
    are re-tied. ``dtype`` is the returned model's dtype; when it is the dtype the
    artifact was stored in (its ``storage.dense_dtype``), the logits equal the in-memory
    compressed model's bit for bit. ``compression`` is the index minus the tensor list.
    A compressed-tensors or GPTQ checkpoint of another tool loads the same way
    (:func:`ctp.compress.formats.read_foreign`).

    ``runtime="packed"`` keeps every quantized linear the kernels take as codes in memory
    (:mod:`ctp.compress.packed`; ``act_dtype`` defaults to bf16) and rebuilds the rest dense;
    the packed layers are built on ``device`` (the kernels' layouts differ between CPU and GPU).
    ``embeddings="int8"`` (packed runtime only) also holds the input embedding and the LM head as int8 codes
    with a scale per row (:func:`ctp.compress.packed.pack_embeddings`): less memory and a faster head, at a
    small measured change of the model.
    """
    if runtime not in ("dense", "packed"):
        raise ValueError(f"runtime must be 'dense' or 'packed', not {runtime!r}")
    require(embeddings in ("dense", "int8"), f"unknown embeddings {embeddings!r}", "use dense or int8")
    require(embeddings == "dense" or runtime == "packed", "int8 embeddings need the packed runtime",
            "add --runtime packed, or drop --packed-embeddings")
    path = Path(path)
    meta, dense, comp, label = read_payload(path)
    config, tokenizer = _read_config(path, meta)
    stored = _NAME_DTYPES.get(meta["storage"].get("dense_dtype", "float32"), torch.float32)
    model = _empty_model(path, config, stored, meta, dense)
    if dtype != stored:
        model.to(dtype)
    _fill_linears(path, model, meta["tensors"], comp, runtime, act_dtype, device)
    if embeddings == "int8":
        from ctp.compress.packed import default_act_dtype, pack_embeddings
        from ctp.models.fingerprint import embedding_fingerprint

        pack_embeddings(model, act_dtype or default_act_dtype(device), device, embedding_fingerprint(model))
    model.eval()
    del dense, comp
    release_memory()
    skip = ("tensors", "aliases", "tokenizer", "files_sha256", "index_sha256")
    compression = {k: v for k, v in meta.items() if k not in skip}
    compression["label"] = label
    return model, tokenizer, compression


def read_payload(path: Path) -> tuple[dict, dict[str, Tensor], dict[str, Tensor], str]:
    """(index, dense tensors, compressed tensors, label) of a ctp artifact or a foreign quantized checkpoint."""
    if not (path / MARKER).is_file():  # a checkpoint quantized by another tool, read into ctp's encoding
        from ctp.compress.foreign import read_foreign

        meta, dense, comp = read_foreign(path)
        return meta, dense, comp, meta["label"]
    meta = read_index(path)
    label = CompressConfig.from_dict(meta["config"]).label()  # validates the recorded recipe
    try:
        dense, _ = load_tensors(path / DENSE_FILE, kind=DENSE_KIND, what="dense weights")
        comp, _ = load_tensors(path / COMPRESSED_FILE, kind=COMPRESSED_KIND, what="compressed weights")
    except CTPError as e:  # the file's own message, with the fix for an artifact directory
        raise CTPError(e.problem, f"the compressed model in {path} is incomplete or damaged: "
                                  "recreate it with ctp compress") from e
    return meta, dense, comp, label


def _read_config(path: Path, meta: dict):
    """(model config, tokenizer or None); no code from the directory runs."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        if hasattr(config, "quantization_config"):  # a foreign checkpoint's: ctp runs its codes itself
            del config.quantization_config
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False) if meta.get("tokenizer", True) else None
    except (OSError, ValueError) as e:
        raise CTPError(f"cannot read the model config or tokenizer in {path}: {str(e).splitlines()[0]}",
                       "the artifact is damaged: recreate it") from e
    return config, tokenizer


def _empty_model(path: Path, config, stored: torch.dtype, meta: dict, dense: dict[str, Tensor]) -> nn.Module:
    """The model with its dense tensors in place and its compressed linears' weights still on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):  # no memory for weights: each comes from the artifact
        model = AutoModelForCausalLM.from_config(config, dtype=stored, trust_remote_code=False)
    index: dict[str, dict] = meta["tensors"]
    aliases: dict[str, str] = meta.get("aliases", {})
    result = model.load_state_dict(dense, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - ({f"{n}.weight" for n in index} | set(aliases) | tied)
    if missing or result.unexpected_keys:
        raise CTPError(f"{path} does not fit its model config (missing {sorted(missing)[:3]}, "
                       f"unexpected {sorted(result.unexpected_keys)[:3]})", "the artifact is damaged: recreate it")
    modules = dict(model.named_modules())
    for name, entry in index.items():
        if name not in modules:
            raise CTPError(f"{path}: compressed layer {name} is not in the model", "the artifact is damaged")
        if tuple(weight_matrix(modules[name]).shape) != tuple(entry["shape"]):
            raise CTPError(f"{path}: {name} has shape {entry['shape']}, the model expects "
                           f"{tuple(weight_matrix(modules[name]).shape)}", "the artifact is damaged: recreate it")
    _retie(model, aliases)
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _fill_linears(path: Path, model: nn.Module, index: dict[str, dict], comp: dict[str, Tensor], runtime: str,
                  act_dtype: torch.dtype | None, device: str | torch.device) -> None:
    """Put each compressed linear in place: a packed kernel module, or its dense rebuild."""
    packed, dense_why = 0, {}
    if runtime == "packed":
        from ctp.compress.packed import default_act_dtype, pack_linear, packable

        act_dtype = act_dtype or default_act_dtype(device)
    for name, entry in index.items():
        mod = model.get_submodule(name)
        why = packable(entry) if runtime == "packed" else "dense runtime"
        if why is None:
            codes, scale, zero, g = decode_codes(name, entry, comp)
            model.set_submodule(name, pack_linear(codes, scale, zero, g, entry["bits"], getattr(mod, "bias", None),
                                                  act_dtype=act_dtype, device=device))
            packed += 1
        else:
            set_weight_matrix(mod, decode_weight(name, entry, comp))  # (out, in) fp32, cast to the module's dtype
            dense_why[name] = why
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CTPError(f"{path} holds no weights for {left[0]}" + (f" and {len(left) - 1} more" if len(left) > 1 else ""),
                       "the artifact is damaged: recreate it")
    if runtime == "packed":
        log.info("packed %d of %d compressed linears%s", packed, len(index),
                 f"; dense: {len(dense_why)} ({'; '.join(sorted(set(dense_why.values())))})" if dense_why else "")


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make every alias key share its source tensor again (tied embeddings)."""
    if not aliases:
        return
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    for alias, src in aliases.items():
        a_mod, _, a_name = alias.rpartition(".")
        s_mod, _, s_name = src.rpartition(".")
        a_owner, s_owner = model.get_submodule(a_mod), model.get_submodule(s_mod)
        if getattr(a_owner, a_name) is getattr(s_owner, s_name):
            continue
        setattr(a_owner, a_name, getattr(s_owner, s_name))


__all__ = ["MARKER", "decode_codes", "default_dense_dtype", "estimate_bytes", "decode_mask", "decode_weight", "encode_weight", "load_compressed", "read_index", "save_compressed"]
