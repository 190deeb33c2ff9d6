"""Load a causal LM and its tokenizer from a name, a directory, a GGUF file or a hub id.

Resolution order for a model spec:

1. a named model shipped by a pip package (``smollm2-135m``, ``gemma3-270m``):
   its GGUF file is dequantised once to an fp32 Hugging Face directory in the
   cache and reused afterwards;
2. a directory written by ``ctp compress`` (holds ``ctp_compression.json``), or a
   compressed-tensors / GPTQ checkpoint of another tool: rebuilt from its packed weights
   (dense, or kept packed with ``runtime="packed"``);
3. any local Hugging Face directory (``config.json``);
4. a local ``.gguf`` file (converted once and cached, like 1);
5. otherwise a hub id ``org/name`` (needs a network, or the Hugging Face cache: a hub
   id that is neither cached nor downloadable fails at once, in one line).

Missing, unreadable or damaged files are :class:`~ctp.errors.CTPError` naming the file
problem and the fix, never a traceback.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ctp.errors import CTPError
from ctp.models.fingerprint import embedding_fingerprint
from ctp.models.names import (COMPRESSED_MARKER, DEFAULT_MODEL, NAMED_MODELS, NamedModel, foreign_quantization,
                              is_compressed_artifact)

log = logging.getLogger(__name__)





@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is, recorded in every artifact made from it."""

    spec: str  # what the user passed
    path: str  # directory or hub id the weights came from
    model_type: str
    hidden_size: int
    vocab_size: int
    num_layers: int
    tokenizer_hash: str
    compression: dict | None = None  # the compression config when loaded from a ctp artifact
    embedding_hash: str | None = None  # fingerprint of the input-embedding matrix (see embedding_fingerprint)
    runtime: str = "dense"  # "packed" when quantized linears run through low-bit kernels (ctp.compress.packed)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def base_hash(self) -> str | None:
        """The embedding fingerprint of the uncompressed base model: the source's for a compressed model.

        Prompts carry over between compressions of one base, never between bases.
        """
        source = (self.compression or {}).get("source") or {}
        return source.get("embedding_hash") or (None if self.compression else self.embedding_hash)


def cache_dir() -> Path:
    """Root of ctp's cache: $CTP_CACHE, else $XDG_CACHE_HOME/ctp, else ~/.cache/ctp."""
    root = os.environ.get("CTP_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ctp"


def _package_dir(named: NamedModel, name: str) -> Path:
    spec = importlib.util.find_spec(named.package)
    if spec is None or not spec.submodule_search_locations:
        raise CTPError(
            f"model '{name}' needs the pip package {named.pip_name}",
            f"install it with: {named.install}",
        )
    return Path(list(spec.submodule_search_locations)[0])


def _named_gguf(name: str) -> Path:
    named = NAMED_MODELS[name]
    pkg = _package_dir(named, name)
    if named.gguf is not None:
        path = pkg / named.gguf
    else:  # packages split into chunks (their dependencies) rebuild the file on request
        try:
            module = importlib.import_module(named.package)
            path = Path(module.assemble())
        except ModuleNotFoundError as e:
            raise CTPError(f"model '{name}' is missing the chunk package {e.name} of {named.pip_name}",
                           f"install it with its chunks: {named.install} (not --no-deps)") from None
        except OSError as e:
            raise CTPError(f"model '{name}' could not be assembled from {named.pip_name} ({e.strerror or e})",
                           "free disk space in the package's folder, or reinstall it") from None
    if not path.is_file():
        raise CTPError(f"model file {path} is missing", f"reinstall it with: {named.install}")
    return path


def _gguf_cache_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]


def _check_gguf_header(path: Path) -> None:
    """A one-line error for an empty, tiny or non-GGUF file, before transformers reads it."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise CTPError(f"cannot read {path}: {e.strerror or e}", "check the path and its permissions") from None
    if len(head) < 24 or head[:4] != b"GGUF":
        what = ("empty" if not head else "not a GGUF file (no GGUF magic bytes)" if head[:4] != b"GGUF"
                else "too short to be a GGUF model")
        raise CTPError(f"{path} is {what}", "pass a complete .gguf model file")


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint to an fp32 Hugging Face directory (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").is_file():
        return out_dir
    log.info("converting %s to an fp32 Hugging Face directory (once): %s", gguf_path.name, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _check_gguf_header(gguf_path)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        try:
            tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
        except (ValueError, OSError, EOFError, KeyError, IndexError, RuntimeError, TypeError, struct.error) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise CTPError(f"cannot read the GGUF file {gguf_path}: {first}",
                           "the file is truncated, damaged or of an architecture transformers cannot read: "
                           "download it again") from e
        # The weights are dequantised fp32 now; drop the GGUF quantizer so the directory saves as plain HF.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, out_dir)
        except OSError:  # another process finished first
            if not (out_dir / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve(spec: str) -> str:
    """Turn a model spec into a local directory or a hub id (see the module docstring)."""
    if spec in NAMED_MODELS:
        return str(convert_gguf(_named_gguf(spec), cache_dir() / "models" / spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        if is_compressed_artifact(path) or (path / "config.json").is_file():
            return str(path)
        raise CTPError(f"{spec} is a directory but holds no config.json", "pass a Hugging Face model directory")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CTPError(f"{spec} is a file but not a .gguf model", "pass a model directory, a .gguf file or a name")
        return str(convert_gguf(path, cache_dir() / "models" / f"{path.stem}-{_gguf_cache_key(path)}"))
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and " " not in spec
    if not looks_like_hub_id:
        names = ", ".join(NAMED_MODELS)
        raise CTPError(
            f"no model at '{spec}'",
            f"pass an existing directory, a .gguf file, a hub id like org/name, or one of: {names}",
        )
    return spec


def _is_hub_id(spec: str, where: str) -> bool:
    return where == spec and not Path(spec).expanduser().exists() and spec not in NAMED_MODELS


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to ``url``'s host opens (True behind a proxy: it cannot be told)."""
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return True
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def check_hub(spec: str) -> None:
    """Fail fast, in one line, when hub id ``spec`` is not cached and cannot be downloaded.

    Without this, transformers retries for about a minute and then reports a
    connection error in several lines of log output.
    """
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(spec, "config.json"), str)
    except Exception:  # an id the cache cannot even look up (odd characters): transformers will say more
        return
    if cached:
        return
    fix = "connect to the network to download it, or pass a local model directory or a named model"
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        raise CTPError(f"hub model '{spec}' is not in the local cache and HF_HUB_OFFLINE is set (no network)",
                       f"unset HF_HUB_OFFLINE and {fix}")
    endpoint = _hub_endpoint()
    if not _reachable(endpoint):
        raise CTPError(f"hub model '{spec}' is not in the local cache and {endpoint} cannot be reached (no network)",
                       fix)


def check_model_spec(spec: str) -> None:
    """Cheap checks of a model spec, loading nothing: an error now rather than after hours of other work."""
    if spec in NAMED_MODELS:
        _package_dir(NAMED_MODELS[spec], spec)
        return
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return  # resolve() would convert it
    _resolve_reachable(spec)  # missing paths, directories without a model, other files, unreachable hub ids


def _load_error(spec: str, where: str, what: str, e: Exception) -> CTPError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if _is_hub_id(spec, where):
        fix = "check the id, and the network for a model not yet downloaded"
    elif what == "model" and (Path(where) / "compressed.safetensors").is_file():
        fix = (f"{where} holds compressed weights but no {COMPRESSED_MARKER}: the compressed model is incomplete, "
               "recreate it with ctp compress")
    elif what == "tokenizer":
        fix = f"{where} needs the tokenizer files (tokenizer.json, tokenizer_config.json) saved next to the model"
    else:
        fix = f"the model files in {where} are missing or damaged: save the model there again"
    return CTPError(f"cannot load the {what} of '{spec}': {first}", fix)


# what transformers raises for missing, unreadable or damaged files (SafetensorError for a truncated file)
def _load_errors() -> tuple[type[BaseException], ...]:
    import pickle

    from safetensors import SafetensorError

    return (OSError, ValueError, SafetensorError, EOFError, pickle.UnpicklingError)


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary: prompts are only valid for the same one."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _resolve_reachable(spec: str) -> str:
    """:func:`resolve`, and for a hub id the fast check that it is cached or can be downloaded."""
    where = resolve(spec)
    if _is_hub_id(spec, where):
        check_hub(spec)
    return where


REMOTE_CODE_FIX = "ctp runs no code from a model directory: pass --trust-remote-code if you trust it"


def _remote_code_error(spec: str, e: Exception) -> CTPError | None:
    if "trust_remote_code" in str(e) or "custom code" in str(e):
        return CTPError(f"model '{spec}' needs to run its own Python code (auto_map) to load", REMOTE_CODE_FIX)
    return None


def _tokenizer_at(spec: str, where: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except _load_errors() as e:
        raise _remote_code_error(spec, e) or _load_error(spec, where, "tokenizer", e) from e


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    return _tokenizer_at(spec, _resolve_reachable(spec), trust_remote_code)


def _check_weight_files(spec: str, where: str, allow_pickle: bool) -> None:
    """Refuse a local directory whose weights are only pickles (they can run code when loaded)."""
    d = Path(where)
    if not d.is_dir() or allow_pickle or any(d.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt"))
    if pickles:
        raise CTPError(f"model '{spec}' has only pickle weights ({pickles[0]}), which can run code when loaded",
                       "convert them to safetensors (save_pretrained(..., safe_serialization=True)), or pass "
                       "--allow-pickle if you trust the files")


def _check_loading_info(spec: str, where: str, loading: dict) -> None:
    """Weights that do not match the architecture are an error, not randomly initialised tensors."""
    missing = sorted(loading.get("missing_keys") or [])
    unexpected = sorted(loading.get("unexpected_keys") or [])
    mismatched = [k for k, *_ in (loading.get("mismatched_keys") or [])]
    for what, keys in (("lack", missing), ("have unexpected", unexpected), ("have wrongly shaped", mismatched)):
        if keys:
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            raise CTPError(f"the weights of '{spec}' {what} tensors ({keys[0]}{more}): they belong to another model "
                           "or are incomplete", f"save the model in {where} again with save_pretrained")


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    runtime: str = "dense",
    embeddings: str = "dense",
):
    """Load ``(model, tokenizer, info)``; the model is in eval mode with gradients off.

    No code from the model directory runs unless ``trust_remote_code``; pickle
    weights (``*.bin``) are refused unless ``allow_pickle``; weights with missing,
    unexpected or wrongly shaped tensors are an error (never random initialisation).
    ``runtime="packed"`` keeps a ctp-quantized model's linears as low-bit codes run by
    weight-only kernels (:mod:`ctp.compress.packed`); other models load dense whatever it says.
    ``embeddings="int8"`` with the packed runtime also holds the embedding and LM head as int8.
    """
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    where = _resolve_reachable(spec)
    compression = None
    if is_compressed_artifact(where) or foreign_quantization(where):
        from ctp.compress.artifact import load_compressed  # the compressed-model formats live there

        model, tokenizer, compression = load_compressed(where, dtype=dtype, runtime=runtime, device=device,
                                                        embeddings=embeddings)
    else:
        if runtime == "packed":
            log.warning("%s is not a ctp-quantized model: it runs dense (--runtime packed applies to "
                        "artifacts of ctp compress)", spec)
        _check_weight_files(spec, where, allow_pickle)
        try:
            model, loading = AutoModelForCausalLM.from_pretrained(
                where, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True,
                use_safetensors=None if allow_pickle else True)
        except _load_errors() as e:
            raise _remote_code_error(spec, e) or _load_error(spec, where, "model", e) from e
        _check_loading_info(spec, where, loading)
        tokenizer = _tokenizer_at(spec, where, trust_remote_code)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer, _model_info(spec, where, model, tokenizer, compression)


def _model_info(spec: str, where: str, model, tokenizer, compression: dict | None, source=None) -> ModelInfo:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    cfg = model.config
    return ModelInfo(
        spec=spec,
        path=where,
        model_type=cfg.model_type,
        hidden_size=int(model.get_input_embeddings().weight.shape[1]),
        vocab_size=int(model.get_input_embeddings().weight.shape[0]),
        num_layers=int(getattr(cfg, "num_hidden_layers", 0) or 0),
        tokenizer_hash=tokenizer_fingerprint(tokenizer),
        compression=compression,
        embedding_hash=embedding_fingerprint(model, source),
        runtime="packed" if any(hasattr(m, "dequantized") for m in model.modules()) else "dense",
    )


def load_by_blocks(spec: str, dtype: torch.dtype | str = torch.float32, trust_remote_code: bool = False,
                   allow_pickle: bool = False, embeddings: bool = True):
    """``(model, tokenizer, info, source)`` for compression: from a local safetensors directory, the model with its
    decoder blocks on the meta device and ``source`` (:class:`ctp.models.shards.BlockSource`) to read each block
    when it is compressed, so memory holds one block at a time; any other model loads whole (``source`` None).
    ``embeddings=False`` leaves the input embedding on disk too (``ctp compress`` does): a calibration then reads
    the rows of its tokens alone from ``source``, and the artifact takes the matrix from it."""
    from ctp.models.shards import block_source, load_skeleton

    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    where = _resolve_reachable(spec)
    source = None
    if not (is_compressed_artifact(where) or foreign_quantization(where)):
        try:
            source = block_source(where)
        except CTPError:  # unreadable shards: the whole-model load below names the problem as for any command
            source = None
    model = None
    if source is not None:
        try:
            model = load_skeleton(where, source, dtype, trust_remote_code, embeddings)
        except _load_errors() as e:
            raise _remote_code_error(spec, e) or _load_error(spec, where, "model", e) from e
    if model is None:
        model, tokenizer, info = load_model(spec, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code,
                                            allow_pickle=allow_pickle)
        return model, tokenizer, info, None
    tokenizer = _tokenizer_at(spec, where, trust_remote_code)
    return model, tokenizer, _model_info(spec, where, model, tokenizer, None, source), source


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise CTPError(f"unknown dtype '{name}'", f"use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]
