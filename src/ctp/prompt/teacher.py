"""Distillation targets: the uncompressed teacher's next-token distributions, exact or cached on disk.

With ``topk = 0`` the teacher runs online, in no-grad mode, on each training
window and the student matches its whole distribution (the exact KL). With
``topk = K > 0`` only the teacher's K most likely tokens and the mass of the
rest are kept per position, and they are written to a cache on disk keyed by
the teacher's weights and the window's tokens. A window the teacher has seen
once is never run again: every prompt trained on the same data with the same
teacher (other compression levels, kinds, lengths, learning rates) reads its
targets, and once a run's windows are all cached the teacher is not even
loaded (it need not stay in memory, on a GPU or anywhere). The KL is then the
one between the two distributions coarsened to K+1 outcomes (the K tokens and
"any other"), a lower bound of the exact KL that reaches it as K grows.

A cache entry is one safetensors file per window (``idx`` int32 and ``logp``
float32, both ``(T-1, K)``, and the window's ``ids``), written atomically, so
processes and concurrent runs can share a cache directory.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ctp.errors import CTPError, require
from ctp.io import load_tensors, save_tensors
from ctp.lm import teacher_logprobs

log = logging.getLogger(__name__)

CACHE_VERSION = 1
_KIND = "ctp.teacher-topk"


def weights_fingerprint(model: nn.Module) -> str:
    """A short SHA-256 over every parameter's name, shape, dtype and a strided sample of its values.

    Cheap (a few thousand values per tensor) and changed by any real change of
    the weights: another model, another compression, another dtype.
    """
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().contiguous()
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


class Teacher:
    """Where the distillation targets of a batch come from (see the module docstring).

    ``model`` is the teacher itself, or ``load`` a callable that returns it, called
    on the first window the cache lacks (never, when the cache holds them all).
    ``fingerprint`` names the teacher's weights in the cache (needed with ``load``
    and no ``model``; :func:`weights_fingerprint` of ``model`` otherwise).
    """

    def __init__(self, model: nn.Module | None = None, *, load: Callable[[], nn.Module] | None = None,
                 topk: int = 0, cache_dir: str | Path | None = None, fingerprint: str | None = None):
        if model is None and load is None:
            raise ValueError("Teacher needs a model or a loader")
        self._model, self._load, self.topk = model, load, int(topk)
        self.hits = self.misses = 0
        self.root: Path | None = None
        if self.topk > 0:
            if cache_dir is None:
                from ctp.models.load import cache_dir as ctp_cache

                cache_dir = ctp_cache() / "teacher"
            if fingerprint is None:
                if model is None:
                    raise ValueError("a lazily loaded teacher with a top-k cache needs its fingerprint")
                fingerprint = weights_fingerprint(model)
            self.root = Path(cache_dir) / f"{fingerprint}-top{self.topk}-v{CACHE_VERSION}"

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            log.info("loading the teacher: %d window(s) are not in the cache %s", self.misses, self.root)
            self._model = self._load()
            self._model.eval()
        return self._model

    def eval(self) -> Teacher:
        if self._model is not None:
            self._model.eval()
        return self

    def targets(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's targets for ``ids`` (B, T): (log-probabilities, indices or None), on ``ids``' device.

        Exact: ((B, T-1, V) log-probabilities, None). Top-k: ((B, T-1, K)
        log-probabilities of the tokens ``indices`` (B, T-1, K)).
        """
        if self.topk == 0:
            return teacher_logprobs(self.model, ids), None
        rows: list[tuple[torch.Tensor, torch.Tensor] | None] = [self._read(r) for r in ids]
        missing = [i for i, r in enumerate(rows) if r is None]
        self.hits += len(rows) - len(missing)
        self.misses += len(missing)
        if missing:
            logp = teacher_logprobs(self.model, ids[missing])
            top = logp.topk(min(self.topk, logp.shape[-1]), dim=-1)
            for j, i in enumerate(missing):
                rows[i] = (top.values[j].float().cpu(), top.indices[j].to(torch.int32).cpu())
                self._write(ids[i], *rows[i])
        logp = torch.stack([r[0] for r in rows]).to(ids.device)
        idx = torch.stack([r[1] for r in rows]).to(device=ids.device, dtype=torch.long)
        return logp, idx

    def _path(self, row: torch.Tensor) -> Path:
        digest = hashlib.sha256(row.detach().to(torch.int64).cpu().contiguous().numpy().tobytes()).hexdigest()
        return self.root / digest[:2] / f"{digest[:32]}.safetensors"

    def _read(self, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        path = self._path(row)
        if not path.is_file():
            return None
        try:
            t, _ = load_tensors(path, _KIND, "teacher cache entry")
        except CTPError as e:  # a damaged entry is computed again and replaced
            log.warning("%s", e)
            return None
        if not torch.equal(t["ids"], row.detach().to(torch.int64).cpu()) or t["idx"].shape[-1] != self.topk:
            return None
        return t["logp"], t["idx"]

    def _write(self, row: torch.Tensor, logp: torch.Tensor, idx: torch.Tensor) -> None:
        path = self._path(row)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, {"ids": row.detach().to(torch.int64).cpu().contiguous(), "logp": logp.contiguous(),
                            "idx": idx.contiguous()}, kind=_KIND)


def as_teacher(teacher: nn.Module | Teacher | None, topk: int = 0) -> Teacher | None:
    """``teacher`` as a :class:`Teacher` with ``topk`` (a bare model gets the default cache directory)."""
    if teacher is None:
        return None
    if isinstance(teacher, Teacher):
        require(teacher.topk == topk, f"the teacher keeps its top {teacher.topk} tokens but the training config asks "
                f"for {topk}", "build the Teacher with the config's teacher_topk")
        return teacher
    return Teacher(teacher, topk=topk)


__all__ = ["Teacher", "as_teacher", "weights_fingerprint", "CACHE_VERSION"]
