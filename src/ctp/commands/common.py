"""Arguments and output shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ctp.errors import CTPError, require
from ctp.models.names import DEFAULT_MODEL, NAMED_MODELS


def add_model_args(p: argparse.ArgumentParser, runtime: str | None = "score") -> None:
    """The model flags; ``runtime`` is the command's workload ("score" or "decode") for ``--runtime auto``,
    or None for a command that always runs dense (compress)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"named model ({', '.join(NAMED_MODELS)}), a Hugging Face or ctp-compressed directory, "
                        f"a .gguf file, or a hub id (default: {DEFAULT_MODEL})")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the model is loaded and run in (default: float32)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model directory's own Python code (auto_map) to run; off by default")
    g.add_argument("--allow-pickle", action="store_true",
                   help="allow pickle weights (pytorch_model.bin), which can run code; safetensors only by default")
    if runtime is not None:
        best = "packed" if runtime == "decode" else "dense"
        g.add_argument("--runtime", default="auto", choices=["auto", "dense", "packed"],
                       help="how a ctp-quantized model runs: 'packed' keeps its linears as int4/int8 codes run by "
                            "weight-only kernels (less memory, faster decoding), 'dense' rebuilds them as exact "
                            f"float matrices (faster for long inputs on CPU); auto (default) = {best} for this "
                            "command, the faster one measured (bench/README.md)")
        g.add_argument("--packed-embeddings", default="dense", choices=["dense", "int8"],
                       help="with the packed runtime: int8 also holds the input embedding and LM head as int8 "
                            "codes with a scale per row (less memory, a faster head; changes the model slightly, "
                            "measured in bench/README.md); dense (default) keeps them as loaded")
    p.set_defaults(workload=runtime)


def load_options(args) -> dict:
    """The keyword arguments of :func:`ctp.models.load.load_model` the model flags give (dtype, trust, runtime)."""
    opts = {"dtype": args.dtype, "trust_remote_code": args.trust_remote_code, "allow_pickle": args.allow_pickle}
    if getattr(args, "workload", None) is not None:
        from ctp.models.names import choose_runtime, foreign_quantization, is_compressed_artifact

        runtime = choose_runtime(args.runtime, args.workload)
        quantized = Path(args.model).is_dir() and (is_compressed_artifact(args.model) or foreign_quantization(args.model))
        opts["runtime"] = runtime if args.runtime != "auto" or quantized else "dense"  # auto: no note for dense models
        if args.packed_embeddings != "dense":
            require(opts["runtime"] == "packed", "--packed-embeddings int8 needs the packed runtime",
                    "add --runtime packed (for a ctp-quantized model)")
            opts["embeddings"] = args.packed_embeddings
    return opts


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default=None, metavar="P",
                   help="a prompt to prepend: a ctp prompt file (.safetensors), a PEFT adapter directory, or 'hard' "
                        "for the paper's hard prompt")
    p.add_argument("--allow-foreign-prompt", action="store_true",
                   help="use a prompt learned on another base model (refused by default)")


def device_of(args) -> str:
    """``--device``, checked (an unknown name, or a GPU that is not there, is one line), else the default."""
    from ctp.devices import check_device, default_device

    return check_device(args.device) if args.device else default_device()


def join_launch(args) -> str:
    """This process's device; under ``accelerate launch`` / ``torchrun``, join the process group first.

    For the data-parallel commands (train-prompt, eval). Processes other than
    the main one are made quiet: no progress bars, only errors logged (the
    command itself prints and writes only on the main process).
    """
    from ctp.distributed import init_from_env, is_main

    device = init_from_env(device_of(args))
    if not is_main():
        args.quiet = True
        os.environ["TQDM_DISABLE"] = "1"
        logging.getLogger("ctp").setLevel(logging.ERROR)
    return device


def parse_list(value: str, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise CTPError(f"empty {what} list", f"pass a comma-separated list of {what}")
    return items


def load_prompt_arg(spec: str | None, model, tokenizer, info, args=None):
    """Resolve ``--prompt``: None, 'hard', or a prompt artifact checked against the model."""
    if spec is None:
        return None
    from ctp.prompt.embed import hard_prompt

    if spec == "hard":
        return hard_prompt(model, tokenizer)
    from ctp.data.corpora import leading_ids
    from ctp.lm import check_prompt
    from ctp.prompt.artifact import load_prompt

    prompt = load_prompt(spec, info, allow_foreign=getattr(args, "allow_foreign_prompt", False),
                         lead=leading_ids(tokenizer)).embeddings
    check_prompt(model, prompt)  # a prefix's kv heads and head size must fit too
    return prompt


def check_json_out(args) -> None:
    """Refuse a ``--out`` JSON path that would overwrite the model or the prompt, before any work."""
    if args.out is not None:
        from ctp.io import check_output

        check_output(args.out, args.model, getattr(args, "prompt", None))


def write_json(path: str | None, obj) -> None:
    if path:
        from ctp.io import atomic_write_json

        atomic_write_json(Path(path), obj)


def print_table(rows: list[dict], columns: list[str], file=None) -> None:
    """A plain aligned table on stdout."""
    file = file or sys.stdout
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.4g}"
        return str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)), file=file)


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, default=str)
