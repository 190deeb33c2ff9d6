"""The table of compression methods: names -> implementations, filled by :mod:`ctp.compress.registry`.

Configs (:mod:`ctp.compress.config`) validate method names against this table, so a method
registered with :func:`register_pruner` / :func:`register_quantizer` is accepted everywhere
(CLI, YAML, artifacts) without touching the config code. ``register_joint`` adds a recipe
that prunes and quantizes in one pass (SparseGPT + GPTQ); every other pair runs in sequence.
Importing :mod:`ctp.compress` registers the built-in methods.
"""

from __future__ import annotations

from collections.abc import Callable

PRUNERS: dict[str, Callable] = {}
QUANTIZERS: dict[str, Callable] = {}
JOINT: dict[tuple[str, str], Callable] = {}  # (prune method, quant method) -> one-pass implementation
DATA_FREE: set[str] = set()  # "prune:NAME" / "quant:NAME": methods that read the weights alone
NORMS_ONLY: set[str] = set()  # methods that read only the diagonal of the input Hessian (the inputs' norms)


def register_pruner(name: str, data_free: bool = False, norms_only: bool = False) -> Callable[[Callable], Callable]:
    """Register ``fn(W, H, n_samples, prune_cfg) -> CompressedWeight`` as the pruner ``name``. ``norms_only``:
    it reads only H's diagonal, and is given just that, (in,), when no other method of the recipe needs H."""
    return _registrar(PRUNERS, "prune", name, data_free, norms_only)


def register_quantizer(name: str, data_free: bool = False) -> Callable[[Callable], Callable]:
    """Register ``fn(W, H, n_samples, quant_cfg, keep_mask) -> CompressedWeight`` as the quantizer ``name``."""
    return _registrar(QUANTIZERS, "quant", name, data_free)


def _registrar(table: dict[str, Callable], kind: str, name: str, data_free: bool,
               norms_only: bool = False) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        table[name] = fn
        if data_free:
            DATA_FREE.add(f"{kind}:{name}")
        if norms_only:
            NORMS_ONLY.add(f"{kind}:{name}")
        return fn

    return deco


def register_joint(prune: str, quant: str) -> Callable[[Callable], Callable]:
    """Register ``fn(W, H, n_samples, compress_cfg) -> CompressedWeight`` as the one-pass recipe for the pair."""
    def deco(fn: Callable) -> Callable:
        JOINT[(prune, quant)] = fn
        return fn

    return deco


def registered_methods() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(pruner names, quantizer names) currently registered."""
    return tuple(PRUNERS), tuple(QUANTIZERS)


__all__ = ["DATA_FREE", "NORMS_ONLY", "JOINT", "PRUNERS", "QUANTIZERS", "register_joint", "register_pruner", "register_quantizer",
           "registered_methods"]
