"""One process of a launched group (``accelerate launch`` / ``torchrun``) running ctp commands.

Usage: ``dist_worker.py DIR 'JSON list of argument lists'``. Runs each
``ctp`` command line in turn, as ``accelerate launch -m ctp.cli ...`` would, and
appends the name of every file this process renames into place under DIR
(ctp's atomic writes all end in ``os.replace``) to ``DIR/writes.<rank>``.
"""

import json
import os
import sys
from pathlib import Path

out_dir, commands = Path(sys.argv[1]).resolve(), json.loads(sys.argv[2])
rank = int(os.environ["RANK"])
_replace = os.replace


def recording_replace(src, dst, *args, **kwargs):
    _replace(src, dst, *args, **kwargs)
    dst = Path(dst).resolve()
    if dst.parent == out_dir:
        with open(out_dir / f"writes.{rank}", "a") as f:
            f.write(dst.name + "\n")


os.replace = recording_replace

from ctp.cli import main  # noqa: E402  (after the patch, so every later import sees it)

for argv in commands:
    rc = main(argv)
    if rc:
        sys.exit(rc)
