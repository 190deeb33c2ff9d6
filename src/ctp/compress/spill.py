"""Compressed blocks leave memory as soon as they are done: each block's linears are encoded as the artifact
stores them (packed codes, masks, kept values), written to a work directory, and their weights released.
:func:`ctp.compress.artifact.save_compressed` then streams them into the artifact, one tensor at a time.
Together with :mod:`ctp.models.shards` (blocks read when they are compressed) the memory a compression
needs grows with one block, not with the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ctp.compress.encoding import decode_weight, encode_weight
from ctp.compress.weight import CompressedWeight
from ctp.io import release_memory
from ctp.models.adapter import weight_matrix


class EncodedBlocks:
    """The encoded payloads of the compressed linears so far, on disk under ``root`` (created when needed)."""

    def __init__(self, root: str | Path, value_dtype: torch.dtype, source=None):
        self.root = Path(root)
        self.value_dtype = value_dtype
        self.source = source  # where tensors still on the meta device come from (ctp.models.shards.BlockSource)
        self.entries: dict[str, dict] = {}  # linear name -> artifact index entry
        self._files: dict[str, Path] = {}  # tensor name -> block file
        self.nbytes = 0

    def add(self, index: int, records: dict[str, CompressedWeight], layer: nn.Module, prefix: str) -> None:
        """Encode block ``index``'s linears (``records``, named in the model), check each rebuilds its live weight
        exactly (when stored in the weight's dtype), write them, and release the weights."""
        from safetensors.torch import save_file

        tensors: dict[str, Tensor] = {}
        for name, cw in records.items():
            mod = layer.get_submodule(name[len(prefix) + 1:])
            enc, entry = encode_weight(name, cw, self.value_dtype)
            entry["layout"] = "conv1d" if type(mod).__name__ == "Conv1D" else "linear"
            live = weight_matrix(mod).detach().cpu()
            if live.dtype == self.value_dtype and not torch.equal(decode_weight(name, entry, enc).to(live.dtype), live):
                raise RuntimeError(f"{name}: the stored payload does not rebuild the model's weight")
            tensors.update(enc)
            self.entries[name] = entry
        self.root.mkdir(parents=True, exist_ok=True)  # (a fresh checkpoint may have cleared its directory)
        path = self.root / f"block-{index:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        for k, v in tensors.items():
            self._files[k] = path
            self.nbytes += v.numel() * v.element_size()
        for name, cw in records.items():  # the values live in the file now
            mod = layer.get_submodule(name[len(prefix) + 1:])
            mod.weight = nn.Parameter(torch.empty(mod.weight.shape, dtype=mod.weight.dtype, device="meta"),
                                      requires_grad=False)
            cw.weight = mod.weight
            for attr in CompressedWeight.PAYLOAD:
                setattr(cw, attr, None)
        release_memory()  # the block's freed buffers back to the system, or the heap grows block by block

    def names(self) -> list[str]:
        return list(self._files)

    def read(self, name: str) -> Tensor:
        from safetensors import safe_open

        with safe_open(str(self._files[name]), framework="pt", device="cpu") as f:
            return f.get_tensor(name)


__all__ = ["EncodedBlocks"]
