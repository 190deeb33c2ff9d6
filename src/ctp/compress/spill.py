"""Compressed blocks leave memory as soon as they are done: each block's linears are encoded as the artifact
stores them (packed codes, masks, kept values), written to a work directory, and their weights released.
:func:`ctp.compress.artifact.save_compressed` then streams them into the artifact, one tensor at a time.
Together with :mod:`ctp.models.shards` (blocks read when they are compressed) the memory a compression
needs grows with one block, not with the model.

The calibration activations can leave memory too (:class:`SpilledActivations`): a block's inputs and
outputs on disk, one chunk of windows in memory at a time, for calibrations larger than memory. And so can
a block's compressed linears while its last ones are still at work (:class:`ParkedTensors`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from ctp.compress.encoding import decode_weight, encode_weight
from ctp.compress.weight import CompressedWeight
from ctp.errors import CTPError, require
from ctp.io import release_memory
from ctp.models.shards import SAFETENSORS_DTYPES
from ctp.models.adapter import weight_matrix


class EncodedBlocks:
    """The encoded payloads of the compressed linears so far, on disk under ``root`` (created when needed)."""

    def __init__(self, root: str | Path, value_dtype: torch.dtype, source=None):
        self.root = Path(root)
        self.value_dtype = value_dtype
        self.source = source  # where tensors still on the meta device come from (ctp.models.shards.BlockSource)
        self.entries: dict[str, dict] = {}  # linear name -> artifact index entry
        self._files: dict[str, Path] = {}  # tensor name -> block file
        self._blocks: dict[int, list[str]] = {}  # block index -> the tensors of its file
        self.nbytes = 0

    def add(self, index: int, records: dict[str, CompressedWeight], layer: nn.Module, prefix: str) -> None:
        """Encode block ``index``'s linears (``records``, named in the model), check each rebuilds its live weight
        exactly (when stored in the weight's dtype), write them, and release the weights."""
        self.write(index, self.encode(records, layer, prefix))

    def encode(self, records: dict[str, CompressedWeight], layer: nn.Module, prefix: str) -> dict[str, Tensor]:
        """The encoded tensors of ``records`` (linears of ``layer``, named in the model), each checked to rebuild
        its live weight exactly (when stored in the weight's dtype); the weights are released (meta device)."""
        tensors: dict[str, Tensor] = {}
        for name, cw in records.items():
            mod = layer.get_submodule(name[len(prefix) + 1:])
            enc, entry = encode_weight(name, cw, self.value_dtype)
            entry["layout"] = "conv1d" if type(mod).__name__ == "Conv1D" else "linear"
            live = weight_matrix(mod).detach().cpu()
            if live.dtype == self.value_dtype and not torch.equal(decode_weight(name, entry, enc).to(live.dtype), live):
                raise RuntimeError(f"{name}: the stored payload does not rebuild the model's weight")
            del live
            tensors.update(enc)
            self.entries[name] = entry
            mod.weight = nn.Parameter(torch.empty(mod.weight.shape, dtype=mod.weight.dtype, device="meta"),
                                      requires_grad=False)
            cw.weight = mod.weight  # the values live in the encoded tensors now
            for attr in CompressedWeight.PAYLOAD:
                setattr(cw, attr, None)
        return tensors

    def write(self, index: int, tensors: dict[str, Tensor]) -> None:
        """Write block ``index``'s encoded tensors (from :meth:`encode`) to its file."""
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)  # (a fresh checkpoint may have cleared its directory)
        path = self.root / f"block-{index:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        self._blocks[index] = sorted(tensors)
        for k, v in tensors.items():
            self._files[k] = path
            self.nbytes += v.numel() * v.element_size()
        release_memory()  # the block's freed buffers back to the system, or the heap grows block by block

    def block_entries(self, index: int, names: list[str]) -> dict:
        """What a compression checkpoint records of block ``index`` (its linears ``names``): their index entries
        and the tensors of its file, so a resumed run adopts the file instead of encoding the block again."""
        return {"entries": {n: self.entries[n] for n in names}, "tensors": self._blocks[index]}

    def adopt(self, index: int, recorded: dict) -> None:
        """Take back block ``index``'s file written before an interruption (``recorded`` from
        :meth:`block_entries`); raises :class:`CTPError` when the file is missing or holds other tensors."""
        from safetensors import SafetensorError, safe_open

        path = self.root / f"block-{index:05d}.safetensors"
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                names = sorted(f.keys())
                sizes = {k: f.get_slice(k).get_shape() for k in names}
                dtypes = {k: f.get_slice(k).get_dtype() for k in names}
        except (SafetensorError, OSError) as e:
            raise CTPError(f"the encoded block {path} of the interrupted run cannot be read ({str(e).splitlines()[0]})",
                           f"delete {self.root.parent} to start over") from e
        require(names == sorted(recorded["tensors"]), f"the encoded block {path} holds other tensors than its "
                "checkpoint records", f"delete {self.root.parent} to start over")
        self.entries.update(recorded["entries"])
        self._blocks[index] = names
        for k in names:
            self._files[k] = path
            self.nbytes += math.prod(sizes[k]) * SAFETENSORS_DTYPES[dtypes[k]].itemsize

    def names(self) -> list[str]:
        return list(self._files)

    def read(self, name: str) -> Tensor:
        from safetensors import safe_open

        with safe_open(str(self._files[name]), framework="pt", device="cpu") as f:
            return f.get_tensor(name)


def _write_raw(path: Path, t: Tensor, what: str, fix: str) -> None:
    """``t``'s exact bytes (CPU, contiguous) to ``path``; a failed write is a :class:`CTPError` naming ``what``,
    with ``fix``."""
    try:
        with open(path, "wb") as f:
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
    except OSError as e:
        raise CTPError(f"cannot write {what} to {path} ({e.strerror or e})", fix) from e


def _read_raw(path: Path, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The tensor :func:`_write_raw` wrote, bit for bit, on ``device``."""
    n = math.prod(shape)
    if not n:
        return torch.empty(shape, dtype=dtype, device=device)
    t = torch.from_file(str(path), shared=False, size=n * dtype.itemsize, dtype=torch.uint8)
    return t.view(dtype).view(shape).to(device)


class ParkedTensors:
    """Tensors set aside on disk while they wait, one raw file each under ``root``: :meth:`put` writes a tensor's
    exact bytes (the caller then drops its own reference), :meth:`get` reads a copy back where the tensor was,
    bit for bit, as often as asked; :meth:`discard` removes the files and the directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype, torch.device]] = {}
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.bin"

    def put(self, key: str, t: Tensor) -> None:
        _write_raw(self._path(key), t.detach().cpu().contiguous(), "a finished linear of the block",
                   f"free disk space under {self.root.parent}, where a block's finished linears wait")
        self._meta[key] = (tuple(t.shape), t.dtype, t.device)

    def get(self, key: str) -> Tensor:
        return _read_raw(self._path(key), *self._meta[key])

    def discard(self) -> None:
        for key in self._meta:
            self._path(key).unlink(missing_ok=True)
        self._meta.clear()
        with contextlib.suppress(OSError):
            self.root.rmdir()


class SpilledActivations:
    """A block's calibration hidden states on disk: a sequence of chunks (one tensor per chunk of windows, as the
    driver's in-memory list holds them), one raw file each under ``root``, read back one at a time.

    ``append`` stores a chunk in ``dtype`` (the exact bytes, so a run gives the same results as with the list);
    indexing and iteration read a chunk onto ``device``; ``discard`` removes the files.
    """

    def __init__(self, root: str | Path, device: torch.device | str, dtype: torch.dtype):
        self.root = Path(root)
        self.device = torch.device(device)
        self.dtype = dtype
        self._shapes: list[tuple[int, ...]] = []
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, j: int) -> Path:
        return self.root / f"chunk-{j:05d}.bin"

    def append(self, t: Tensor) -> None:
        t = t.detach().to("cpu", self.dtype).contiguous()
        _write_raw(self._path(len(self._shapes)), t, "calibration activations",
                   f"free disk space under {self.root.parent}, or compress without offloading the activations")
        self._shapes.append(tuple(t.shape))

    def __len__(self) -> int:
        return len(self._shapes)

    def __getitem__(self, j: int) -> Tensor:
        return _read_raw(self._path(j), self._shapes[j], self.dtype, self.device)

    def __iter__(self) -> Iterator[Tensor]:
        return (self[j] for j in range(len(self)))

    def discard(self) -> None:
        """Remove the files (and the directory, once empty)."""
        for j in range(len(self._shapes)):
            self._path(j).unlink(missing_ok=True)
        self._shapes.clear()
        with contextlib.suppress(OSError):
            self.root.rmdir()


__all__ = ["EncodedBlocks", "ParkedTensors", "SpilledActivations"]
