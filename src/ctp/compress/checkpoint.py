"""Resumable compression: what :func:`ctp.compress.driver.compress_model` saves after each block.

A checkpoint directory holds one run's progress::

    state.json                  format version, key, next block to compress, blocks, seconds so far
    block-0000.safetensors      block 0's compressed linears (CompressedWeight tensors) and, in its
    block-0001.safetensors        metadata, their bits/sym/stats and the block's report entry
    ...
    inputs-0002.safetensors     the hidden states that feed ``next_block`` (one tensor per chunk)

Every file goes through :mod:`ctp.io` (temporary name, fsync, rename; checksummed
safetensors), and ``state.json`` is written last, so a kill at any point leaves either
the previous consistent state or the new one. The *key* hashes everything that
determines the result (the model's weights and config, the :class:`CompressConfig`,
the calibration windows, the chunking and the device type): a checkpoint with another
key simply does not match and is discarded. Only the newest block's inputs are kept,
so the directory grows by one block of compressed weights per block.
"""

from __future__ import annotations

import contextlib

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from ctp.compress.config import ALGORITHM_VERSION
from ctp.compress.weight import CompressedWeight
from ctp.errors import CTPError
from ctp.io import (atomic_write_json, digest_of, load_tensors, open_tensors, read_json, save_tensors,
                    save_tensors_streaming, tensors_digest)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_FILE = "state.json"
BLOCK_KIND = "ctp-compress-block"
INPUTS_KIND = "ctp-compress-inputs"
_TENSOR_ATTRS = ("weight", *CompressedWeight.PAYLOAD)


def checkpoint_key(model: nn.Module, cfg_dict: dict, windows: Tensor, chunk: int, device: torch.device,
                   source=None) -> str:
    """A hash of everything that determines a compression run's result; weights still on the meta device are
    read from ``source`` (:class:`ctp.models.shards.BlockSource`), so the key is the whole-model run's."""
    state = dict(model.state_dict())
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version"):
        config.pop(volatile, None)
    blob = {
        "format_version": FORMAT_VERSION,
        "algorithm_version": ALGORITHM_VERSION,
        "weights": digest_of(list(state), state.__getitem__) if source is None else source.scan(model)[0],
        "model_config": config,
        "compress_config": cfg_dict,
        "windows": tensors_digest({"windows": windows}),
        "chunk": chunk,
        "device": torch.device(device).type,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_dir_for(out_dir: str | Path) -> Path:
    """``DIR`` -> ``DIR.partial`` next to it: where the CLI and ``ctp run`` checkpoint a compression."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f"{out_dir.name}.partial")


def _block_file(root: Path, i: int) -> Path:
    return root / f"block-{i:04d}.safetensors"


def _inputs_file(root: Path, i: int) -> Path:
    return root / f"inputs-{i:04d}.safetensors"


ENCODED_DIR = "encoded"
ACTIVATIONS_DIR = "activations"  # calibration activations kept on disk (ctp.compress.spill.SpilledActivations)
PARKED_DIR = "parked"  # a block's finished linears while its others are at work (ctp.compress.spill.ParkedTensors)


def discard_checkpoint(root: str | Path) -> None:
    """Remove a checkpoint's files (only ours: the directory may hold other things) and the directory if empty."""
    root = Path(root)
    if not root.is_dir():
        return
    encoded = root / ENCODED_DIR  # the encoded payloads of a larger-than-memory run (ctp.compress.spill)
    if encoded.is_dir():
        for f in encoded.glob("block-*.safetensors"):
            f.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            encoded.rmdir()
    acts = root / ACTIVATIONS_DIR
    if acts.is_dir():
        for d in acts.glob("block-*"):
            for f in d.glob("chunk-*.bin"):
                f.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            acts.rmdir()
    parked = root / PARKED_DIR  # left by a run killed mid-block
    if parked.is_dir():
        for f in parked.glob("*.bin"):
            f.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            parked.rmdir()
    for f in root.iterdir():
        name = f.name.lstrip(".")
        if f.is_file() and (name.startswith(("block-", "inputs-", STATE_FILE))):
            f.unlink(missing_ok=True)
    try:
        root.rmdir()
    except OSError:
        pass  # not empty: something else lives there


class BlockCheckpoint:
    """Progress of one compression run in ``root`` under ``key`` (see the module docstring)."""

    def __init__(self, root: str | Path, key: str, n_blocks: int, resume: bool = True):
        self.root = Path(root)
        self.key = key
        self.n_blocks = n_blocks
        self.next_block = 0
        self.seconds = 0.0
        state_path = self.root / STATE_FILE
        if state_path.is_file() and resume:
            state = self._read(read_json, state_path, "compression checkpoint state")
            if state.get("format_version") == FORMAT_VERSION and state.get("key") == key \
                    and state.get("n_blocks") == n_blocks:
                self.next_block = int(state["next_block"])
                self.seconds = float(state.get("seconds", 0.0))
                if not 0 <= self.next_block <= n_blocks:
                    raise CTPError(f"compression checkpoint {self.root} is damaged (next block {self.next_block})",
                                   f"delete {self.root} to start over")
                return
            log.info("the checkpoint in %s was made with other settings: starting over", self.root)
        if self.root.exists():
            discard_checkpoint(self.root)

    # ------------------------------------------------------------------ restore

    def _read(self, reader, *args, **kwargs):
        """``reader(*args)``; a damaged file is an error whose fix is to start over."""
        try:
            return reader(*args, **kwargs)
        except CTPError as e:
            raise CTPError(e.problem, f"delete {self.root} to start over, or do not resume") from e

    def restore_block(self, i: int, model_layer: nn.Module, prefix: str,
                      spill=None) -> tuple[dict[str, CompressedWeight], dict, bool]:
        """Write block ``i``'s saved compressed weights into ``model_layer``; its records, report entry, and
        whether ``spill`` (:class:`ctp.compress.spill.EncodedBlocks`) took back the block's encoded file
        instead (the weights then stay on disk)."""
        from ctp.models.adapter import set_weight_matrix, weight_matrix

        tensors, meta = self._read(load_tensors, _block_file(self.root, i), kind=BLOCK_KIND,
                                   what="compression checkpoint block")
        if meta.get("key") != self.key or meta.get("index") != i:
            raise CTPError(f"compression checkpoint {self.root} mixes runs (block {i})",
                           f"delete {self.root} to start over")
        spilled = meta.get("spilled")
        if spilled is not None:
            if spill is None:
                raise CTPError(f"compression checkpoint {self.root} keeps block {i} encoded on disk, which this "
                               "run cannot use", f"compress with the same command, or delete {self.root}")
            spill.adopt(i, spilled)
        records: dict[str, CompressedWeight] = {}
        for full, rec in meta["records"].items():
            name = full[len(prefix) + 1:]
            mod = model_layer.get_submodule(name)
            if spilled is not None:
                records[full] = CompressedWeight(weight=weight_matrix(mod).detach(), bits=rec["bits"], sym=rec["sym"],
                                                 stats=rec["stats"])
                continue
            set_weight_matrix(mod, tensors[f"{full}.weight"])
            parts = {a: tensors.get(f"{full}.{a}") for a in CompressedWeight.PAYLOAD}
            records[full] = CompressedWeight(weight=weight_matrix(mod).detach(), bits=rec["bits"], sym=rec["sym"],
                                             stats=rec["stats"], **parts)
        return records, meta["layer"], spilled is not None

    def load_inputs(self, device: torch.device, into=None):
        """The saved hidden states that feed ``next_block``, one tensor per chunk: a list, or appended one at a time
        to ``into`` (:class:`ctp.compress.spill.SpilledActivations`), the file checked first and never whole in
        memory."""
        names, read, meta = self._read(open_tensors, _inputs_file(self.root, self.next_block), kind=INPUTS_KIND,
                                       what="compression checkpoint inputs")
        n = meta.get("chunks")
        if meta.get("key") != self.key or not isinstance(n, int) or set(names) != {f"chunk.{j}" for j in range(n)}:
            raise CTPError(f"compression checkpoint {self.root} has inputs from another run",
                           f"delete {self.root} to start over")
        out = [] if into is None else into
        for j in range(n):
            out.append(self._read(read, f"chunk.{j}").to(device))
        return out

    # ------------------------------------------------------------------ save

    def save_block(self, i: int, records: dict[str, CompressedWeight], layer_entry: dict, next_inputs: list[Tensor],
                   seconds: float, spilled: dict | None = None) -> None:
        """Record block ``i`` as done, with the inputs of block ``i + 1`` (state.json last). ``spilled``: the
        block is already encoded on disk (:meth:`ctp.compress.spill.EncodedBlocks.block_entries`), so only
        that record is kept, not its weights again."""
        tensors: dict[str, Tensor] = {}
        meta_records = {}
        for full, cw in records.items():
            for a in _TENSOR_ATTRS if spilled is None else ():
                t = getattr(cw, a)
                if t is not None:
                    tensors[f"{full}.{a}"] = t
            meta_records[full] = {"bits": cw.bits, "sym": cw.sym, "stats": cw.stats}
        meta = {"key": self.key, "index": i, "layer": layer_entry, "records": meta_records}
        if spilled is not None:
            meta["spilled"] = spilled
        save_tensors(_block_file(self.root, i), tensors, meta, kind=BLOCK_KIND)
        if i + 1 < self.n_blocks:
            # streamed: no serialized copy of the activations in memory, and they may be on disk
            save_tensors_streaming(_inputs_file(self.root, i + 1), [f"chunk.{j}" for j in range(len(next_inputs))],
                                   lambda name: next_inputs[int(name.split(".")[1])],
                                   {"key": self.key, "chunks": len(next_inputs)}, kind=INPUTS_KIND)
        self.next_block, self.seconds = i + 1, seconds
        atomic_write_json(self.root / STATE_FILE, {"format_version": FORMAT_VERSION, "key": self.key,
                                                   "next_block": self.next_block, "n_blocks": self.n_blocks,
                                                   "seconds": seconds})
        _inputs_file(self.root, i).unlink(missing_ok=True)  # superseded


__all__ = ["BlockCheckpoint", "checkpoint_dir_for", "checkpoint_key", "discard_checkpoint"]
