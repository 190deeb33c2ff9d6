"""Compression of causal LMs: SparseGPT, GPTQ, both jointly, and baselines.

* :mod:`ctp.compress.config`: ``PruneConfig``, ``QuantConfig``, ``CompressConfig``;
* :mod:`ctp.compress.kernels` / :mod:`ctp.compress.quant`: pure per-matrix kernels;
* :mod:`ctp.compress.methods`: the method table configs validate against; :mod:`ctp.compress.registry`
  registers the built-in methods in it and gives ``compress_weight``;
* :mod:`ctp.compress.weight`: ``CompressedWeight``, what every kernel returns and the artifact stores;
* :mod:`ctp.compress.driver`: ``compress_model``, the layer-by-layer pipeline;
* :mod:`ctp.compress.checkpoint`: its per-block resume checkpoint (``discard_checkpoint`` once saved);
* :mod:`ctp.compress.artifact`: ``save_compressed`` / ``load_compressed``, the packed format.
"""

from ctp.compress import registry as _registry  # noqa: F401 - first: registers the built-in methods
from ctp.compress.artifact import load_compressed, save_compressed
from ctp.compress.checkpoint import discard_checkpoint
from ctp.compress.config import CompressConfig, PruneConfig, QuantConfig
from ctp.compress.driver import compress_model
from ctp.compress.report import CompressionReport
from ctp.compress.registry import compress_weight
from ctp.compress.weight import CompressedWeight

__all__ = [
    "CompressConfig",
    "CompressedWeight",
    "CompressionReport",
    "PruneConfig",
    "QuantConfig",
    "compress_model",
    "compress_weight",
    "discard_checkpoint",
    "load_compressed",
    "save_compressed",
]
