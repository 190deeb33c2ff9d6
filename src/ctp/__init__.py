"""ctp: compress a causal language model, then learn a soft prompt that recovers its quality."""

from ctp.errors import CTPError

__version__ = "0.1.0"

__all__ = ["CTPError", "__version__"]
