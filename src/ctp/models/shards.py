"""A Hugging Face checkpoint read one decoder block at a time: compress models larger than memory.

:func:`load_skeleton` builds the model without weight memory (meta tensors), loads every tensor
outside the decoder blocks (embeddings, final norm, LM head: small next to the blocks) and returns
a :class:`BlockSource` from which the compression driver materialises each block just before
compressing it. Tensors are read with plain file reads (no memory map), one at a time and a chunk of
rows at a time, straight into the model's dtype, so a block holds the same values as a whole-model
load (the results are bit-identical, tested) and reading costs no second copy.

Only local directories of ``*.safetensors`` (one file or an index of shards) whose tensor names are
the model's own parameter names qualify; GGUF files, hub ids and pickles load whole as before.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Collection
from pathlib import Path

import torch
from torch import nn

from ctp.errors import CTPError
from ctp.io import release_memory

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


class BlockSource:
    """Tensor name -> shard file of a safetensors checkpoint; reads tensors on demand."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index = self.root / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CTPError(f"{index} is not a safetensors shard index ({e})",
                               "the checkpoint is damaged: download or save it again") from e
        else:
            files = sorted(self.root.glob("*.safetensors"))
            if len(files) != 1:
                raise CTPError(f"{self.root} holds {len(files)} safetensors files and no {INDEX_FILE}",
                               "pass a directory written by save_pretrained")
            weight_map = {name: files[0].name for name in _names(files[0])}
        self.files = {name: self.root / f for name, f in weight_map.items()}
        missing = sorted({str(p) for p in self.files.values() if not p.is_file()})
        if missing:
            raise CTPError(f"checkpoint shard {missing[0]} is missing", "download the whole checkpoint again")

    def names(self) -> set[str]:
        return set(self.files)

    @torch.no_grad()
    def scan(self, model: nn.Module) -> tuple[str, float]:
        """(digest, largest absolute floating-point value) of ``model``'s state, tensors on the meta device read
        from the checkpoint in the model's dtype: :func:`ctp.io.digest_of` of the whole model as if loaded.

        One pass over the checkpoint serves both (the compression's cache key and its storage dtype); the
        result is kept until a tensor of the model changes (its pointer or in-place version).
        """
        from ctp.io import digest_of

        state = model.state_dict()
        key = tuple((n, str(t.dtype), tuple(t.shape), t.is_meta, 0 if t.is_meta else t.data_ptr(),
                     0 if t.is_meta else t._version) for n, t in sorted(state.items()))
        if getattr(self, "_scan", (None,))[0] == key:
            return self._scan[1]
        big = [0.0]

        def largest(t: torch.Tensor) -> torch.Tensor:  # no |t| copy: a 262k-row embedding is 0.5 GB or more
            if t.is_floating_point() and t.numel():
                lo, hi = torch.aminmax(t.detach())
                big[0] = max(big[0], -float(lo), float(hi))
            return t

        stored_as = self.stored_names(model)

        def read(name: str):
            t = state[name]
            if not t.is_meta:
                return largest(t)
            name = stored_as.get(name, name)
            stored = self._entry(name)[2]
            dtype = t.dtype if stored.is_floating_point else stored
            return dtype, tuple(t.shape), (largest(c) for _, c in self.chunks(name, t.dtype))

        result = digest_of(list(state), read), big[0]
        self._scan = (key, result)
        release_memory()
        return result

    def stored_names(self, model: nn.Module) -> dict[str, str]:
        """State-dict name -> the name the checkpoint holds it under, for tensors tied to another (a tied LM head
        saved once, as its embedding)."""
        live = model.state_dict(keep_vars=True)
        holder: dict[int, str] = {}
        for n, t in live.items():
            if n in self.files:
                holder.setdefault(id(t), n)
        return {n: holder[id(t)] for n, t in live.items() if n not in self.files and id(t) in holder}

    def name_of(self, model: nn.Module, tensor: torch.Tensor) -> str:
        """The name the checkpoint holds ``model``'s parameter ``tensor`` under (a tied one under its holder's)."""
        name = next(n for n, p in model.named_parameters() if p is tensor)
        return self.stored_names(model).get(name, name)

    def read(self, name: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """One tensor, cast to ``dtype`` on ``device``.

        Read with plain file reads, a chunk of rows at a time, straight into the result: no memory map
        (whose pages would count as resident) and no whole second copy in the stored dtype, so reading
        a tensor costs its size in ``dtype`` and one chunk.
        """
        _, shape, stored, _, _ = self._entry(name)
        out = torch.empty(shape, dtype=dtype if stored.is_floating_point else stored)
        if not out.numel():
            return out.to(device)
        flat = out.view(-1, *shape[1:]) if shape else out.view(1)
        for rows, chunk in self.chunks(name, dtype):
            flat[rows] = chunk
        return out.to(device)

    def rows(self, name: str, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``index`` (1-D, in range) of tensor ``name`` in ``dtype``, in that order: ``read(name)[index]``
        without the whole tensor in memory (one pass over it, a chunk at a time). The calibration of a model whose
        embedding stays on disk reads the rows of its tokens this way."""
        shape = self._entry(name)[1]
        index = index.long().reshape(-1)
        bad = index[(index < 0) | (index >= shape[0])]
        if bad.numel():
            raise CTPError(f"token id {int(bad[0])} is outside {name}'s {shape[0]} rows",
                           "use a tokenizer that matches the model")
        out = torch.empty(index.numel(), *shape[1:], dtype=dtype)
        for span, chunk in self.chunks(name, dtype):
            hit = (index >= span.start) & (index < span.stop)
            if hit.any():
                out[hit] = chunk[index[hit] - span.start]
        return out

    def chunks(self, name: str, dtype: torch.dtype, elements: int = 1 << 22):
        """``(row slice, rows)`` of tensor ``name`` in ``dtype`` (floating-point tensors; others as stored),
        about ``elements`` values at a time, in order."""
        path, shape, stored, start, end = self._entry(name)
        if not stored.is_floating_point:
            dtype = stored
        if end == start:  # no values: nothing to read
            return
        rows = shape[0] if shape else 1
        per_row = (end - start) // rows  # bytes of one row
        step = max(1, elements * stored.itemsize // per_row)
        try:
            with open(path, "rb") as f:
                for r in range(0, rows, step):
                    n = min(step, rows - r)
                    buf = bytearray(n * per_row)
                    f.seek(start + r * per_row)
                    if f.readinto(buf) != len(buf):
                        raise OSError("unexpected end of file")
                    t = torch.frombuffer(buf, dtype=stored)
                    yield slice(r, r + n), t.view(n, *shape[1:]).to(dtype)
        except OSError as e:
            raise CTPError(f"cannot read {name} from {path}: {e}",
                           "the shard is truncated or damaged: download it again") from e

    def _entry(self, name: str) -> tuple[Path, tuple[int, ...], torch.dtype, int, int]:
        """(file, shape, stored dtype, first byte, end byte) of tensor ``name``, from its shard's header."""
        path = self.files.get(name)
        if path is None:
            raise CTPError(f"tensor {name} is not in the checkpoint {self.root}",
                           "the checkpoint does not match its config: download it again")
        header, base = _header(path)
        meta = header.get(name)
        if not isinstance(meta, dict) or meta.get("dtype") not in SAFETENSORS_DTYPES:
            raise CTPError(f"cannot read {name} from {path}: "
                           + ("not in the file" if not isinstance(meta, dict) else f"dtype {meta.get('dtype')}"),
                           "the shard is truncated or damaged: download it again")
        lo, hi = meta["data_offsets"]
        stored = SAFETENSORS_DTYPES[meta["dtype"]]
        shape = tuple(int(d) for d in meta["shape"])
        if hi - lo != stored.itemsize * math.prod(shape) or base + hi > path.stat().st_size:
            raise CTPError(f"cannot read {name} from {path}: its bytes run past the end of the file",
                           "the shard is truncated or damaged: download it again")
        return path, shape, stored, base + lo, base + hi

    def load_module(self, module: nn.Module, prefix: str, device: torch.device | str, dtype: torch.dtype,
                    skip: Collection[str] = ()) -> None:
        """Fill every parameter and persistent buffer of ``module`` (named ``prefix`` in the model) from the
        checkpoint, on ``device``, except the parameters named in ``skip`` (left as they are); buffers the
        checkpoint does not hold (rotary tables) are left as they are (the driver moves the block to its
        device)."""
        for name, p in list(module.named_parameters(recurse=True)):
            if name in skip:
                continue
            _assign(module, name, nn.Parameter(self.read(f"{prefix}.{name}", dtype, device),
                                               requires_grad=p.requires_grad))
        for name, _ in list(module.named_buffers(recurse=True)):
            if f"{prefix}.{name}" in self.files:
                _assign(module, name, self.read(f"{prefix}.{name}", dtype, device))


def _names(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CTPError(f"cannot read {path}: {str(e).splitlines()[0]}",
                       "the checkpoint is truncated or damaged: download it again") from e


# safetensors header dtype names
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


_HEADERS: dict[tuple[str, float, int], tuple[dict, int]] = {}


def _header(path: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header and where its data begin (cached per file state)."""
    st = path.stat()
    key = (str(path), st.st_mtime, st.st_size)
    if key not in _HEADERS:
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 0 < n <= st.st_size - 8:
                    raise ValueError(f"header length {n}")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as e:
            raise CTPError(f"cannot read the header of {path}: {e}",
                           "the shard is truncated or damaged: download it again") from e
        _HEADERS[key] = (header, 8 + n)
    return _HEADERS[key]


def _assign(module: nn.Module, dotted: str, value) -> None:
    owner, _, leaf = dotted.rpartition(".")
    target = module.get_submodule(owner) if owner else module
    if isinstance(value, nn.Parameter):
        target._parameters[leaf] = value
    else:
        target._buffers[leaf] = value


def block_source(where: str | Path) -> BlockSource | None:
    """The block source of a local safetensors directory, or None when the directory does not qualify."""
    d = Path(where)
    if not d.is_dir() or not (d / "config.json").is_file():
        return None
    if not ((d / INDEX_FILE).is_file() or len(list(d.glob("*.safetensors"))) == 1):
        return None
    return BlockSource(d)


def load_skeleton(where: str | Path, source: BlockSource, dtype: torch.dtype, trust_remote_code: bool = False,
                  embeddings: bool = True) -> nn.Module | None:
    """The model with its decoder blocks left on the meta device and everything else loaded (but the input
    embedding without ``embeddings``: a calibration reads the rows of its tokens alone, and the artifact takes
    the matrix from ``source``); None when the checkpoint's names are not the model's (the caller then loads the
    whole model)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(where), trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    from ctp.models.adapter import get_arch

    block_prefix = get_arch(model).layers
    wanted, have = set(model.state_dict()), source.names()
    tied = wanted - have
    in_blocks = {n for n in wanted if n.startswith(block_prefix + ".")}
    if not (wanted - tied) or tied - _tied_names(model) or not in_blocks <= have:
        log.info("%s: tensor names differ from the model's; loading it whole", where)
        return None
    _load_outside(model, source, block_prefix, dtype, embeddings)  # the blocks come one at a time, later
    model.tie_weights()
    model.eval()
    model.requires_grad_(False)
    release_memory()  # the fp16 -> fp32 temporaries of the loaded tensors
    return model


def _tied_names(model: nn.Module) -> set[str]:
    """State-dict names that share storage with another name (a tied LM head) or are not persisted."""
    seen: dict[int, str] = {}
    tied = set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = id(t)
        if key in seen:
            tied.add(name)
        seen.setdefault(key, name)
    tied_keys = getattr(model, "_tied_weights_keys", None) or []
    if isinstance(tied_keys, dict):
        tied_keys = list(tied_keys)
    return tied | {n for n in model.state_dict() if any(n == k or n.endswith(k) for k in tied_keys)}


def _load_outside(model: nn.Module, source: BlockSource, block_prefix: str, dtype: torch.dtype,
                  embeddings: bool = True) -> None:
    """Load every parameter and buffer whose name is outside ``block_prefix`` (leaving tied copies), except an
    untied LM head: compression never runs it (the calibration pass stops after the last block), so it stays
    on the meta device and is read from ``source`` when the artifact is written; so does the input embedding
    without ``embeddings``."""
    names = source.names()
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    head = out.weight if out is not None and out.weight is not inp.weight else None
    left = {id(head), id(None)} | (set() if embeddings else {id(inp.weight)})
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        if name.startswith(block_prefix + ".") or name not in names or id(p) in left:
            continue
        _assign(model, name, nn.Parameter(source.read(name, dtype), requires_grad=False))
    for name, b in list(model.named_buffers()):
        if name.startswith(block_prefix + "."):
            continue
        if name in names:
            _assign(model, name, source.read(name, dtype))
        elif b is not None and b.is_meta:
            raise CTPError(f"buffer {name} is neither in the checkpoint nor computable", "load the model whole")


__all__ = ["BlockSource", "INDEX_FILE", "SAFETENSORS_DTYPES", "block_source", "load_skeleton"]
