"""Logging set-up shared by the CLI and the processes it starts (``ctp run --workers``)."""

from __future__ import annotations

import logging

# third-party loggers that report routine work at INFO; ctp shows their errors only, unless -vv
NOISY_LOGGERS = ("transformers", "accelerate", "datasets", "huggingface_hub", "urllib3", "filelock", "httpx")


def quiet_third_party(level: int = logging.ERROR) -> None:
    """Set the level of every logger in :data:`NOISY_LOGGERS`."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(level)
