"""``ctp compress``: prune and/or quantize a model layer by layer, save a packed artifact.

Flags map one-to-one onto :class:`~ctp.compress.config.CompressConfig` fields (``--blocksize``
and ``--percdamp`` set both the prune and the quant config); ``--config FILE`` loads a whole
config from JSON or YAML and explicit flags override it. At least one of ``--sparsity``,
``--nm`` or ``--bits`` (or a config file) says what to do.

Each finished block is checkpointed in ``OUT.partial/`` next to the output: a killed run,
started again with the same arguments, continues after the last finished block (unless
``--no-resume``) and gives the same artifact. The checkpoint is removed once the artifact
is written.

A local model saved in safetensors (one file or shards with an index) is never loaded whole:
each decoder block is read when it is compressed, encoded into ``OUT.partial/encoded/`` when
done and released, so memory grows with one block and the calibration activations, not with
the model (bench/README.md, "Models larger than memory"). GGUF files and hub ids load whole.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ctp.commands.common import add_model_args, device_of, load_options, print_table
from ctp.errors import CTPError, require

# flag dest -> (section, CompressConfig / PruneConfig / QuantConfig field)
_PRUNE_FLAGS = {"prune_method": "method", "sparsity": "sparsity"}
_QUANT_FLAGS = {"quant_method": "method", "bits": "bits", "group_size": "group_size", "sym": "sym",
                "act_order": "act_order", "true_sequential": "true_sequential"}
_TOP_FLAGS = {"nsamples": "nsamples", "seqlen": "seqlen", "calib": "calib_dataset", "seed": "seed",
              "activations": "activations"}
_SAVE_DTYPES = ("auto", "float32", "float16", "bfloat16")


def register(sub) -> None:
    p = sub.add_parser(
        "compress",
        help="compress a model (SparseGPT, GPTQ, both, or a baseline) and save it packed",
        description="Layer-by-layer compression on calibration text: prune (--sparsity / --nm), quantize "
                    "(--bits), or both (sparsegpt + gptq run jointly in one pass). The output directory is "
                    "loadable by every ctp command (--model DIR) and stores codes and masks, not dense weights. "
                    "A local safetensors model is read one decoder block at a time, so it need not fit in memory.",
    )
    add_model_args(p, runtime=None)
    p.add_argument("--out", required=True, help="output directory for the compressed model")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a CompressConfig as JSON or YAML (unknown keys rejected); flags override it")
    g = p.add_argument_group("pruning")
    g.add_argument("--sparsity", type=float, default=None, help="fraction of weights removed per row, e.g. 0.5")
    g.add_argument("--nm", default=None, metavar="N:M", help="semi-structured: keep N of every M inputs, e.g. 2:4")
    g.add_argument("--prune-method", default=None, help="sparsegpt (default) | magnitude | wanda")
    g = p.add_argument_group("quantization")
    g.add_argument("--bits", type=int, default=None, help="2, 3, 4 or 8")
    g.add_argument("--quant-method", default=None, help="gptq (default) | rtn")
    g.add_argument("--group-size", type=int, default=None, help="inputs per (scale, zero) group; -1: per row (default)")
    g.add_argument("--sym", action="store_true", default=None, help="symmetric grid")
    g.add_argument("--act-order", action="store_true", default=None,
                   help="GPTQ: quantize columns by descending Hessian diagonal (recommended with --group-size: on "
                        "the default model it turned GPTQ from level with RTN into clearly better, see README)")
    g.add_argument("--no-true-sequential", dest="true_sequential", action="store_false", default=None,
                   help="compress all linears of a block from one pass instead of in execution order")
    g = p.add_argument_group("calibration and solver")
    g.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128)")
    g.add_argument("--seqlen", type=int, default=None, help="tokens per calibration window (default 2048)")
    g.add_argument("--calib", default=None, help="calibration corpus, train split: c4 (default) | wikitext2 | ptb")
    g.add_argument("--seed", type=int, default=None, help="calibration sampling seed (default 0)")
    g.add_argument("--percdamp", type=float, default=None, help="Hessian dampening (default 0.01)")
    g.add_argument("--blocksize", type=int, default=None, help="columns per lazy OBS block (default 128)")
    g.add_argument("--calib-batch", type=int, default=None,
                   help="calibration windows per block forward (default: as many as make 4,096 tokens, at least 1: "
                        "8 windows of 512 tokens, 2 of 2048): the forward's intermediates grow with it, so a smaller "
                        "one lowers peak memory (a changed value sums the Hessians in another order: results differ "
                        "in the last bits)")
    g.add_argument("--activations", default=None, choices=("float32", "float16", "bfloat16"),
                   help="dtype the calibration activations are kept in between blocks (each block still computes "
                        "in the model's dtype): float32 (default); float16 halves their memory, for long "
                        "calibrations of wide models (its effect on the result: bench/README.md)")
    g.add_argument("--offload-activations", action="store_true",
                   help="keep the calibration activations on disk (under OUT.partial/, about 3x their size) with one "
                        "--calib-batch of them in memory at a time, for calibrations larger than memory; the "
                        "result is bit-identical")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over instead of resuming from the checkpoint OUT.partial/ an interrupted run left")
    p.add_argument("--save-dtype", default="auto",
                   help="dtype of the uncompressed tensors (embeddings, norms, head) on disk: auto (default) = "
                        "float16 for an fp32 model (bfloat16 if a value overflows float16), measured to move "
                        "perplexity by < 0.002%%; float32 keeps them exact; float16, bfloat16")
    p.set_defaults(func=run)


def _read_config_file(path: str) -> dict:
    from ctp.io import read_config_file

    data = read_config_file(path, "config file")
    require(isinstance(data, dict), f"config file {path} does not hold a mapping", "write key: value pairs")
    return data


def _already_done(out: Path, cfg, model_spec: str) -> bool:
    """True (with a message) when ``out`` already holds this recipe applied to this model by this ctp version."""
    from ctp.compress.artifact import read_index
    from ctp.compress.config import ALGORITHM_VERSION
    from ctp.models.names import is_compressed_artifact

    if not is_compressed_artifact(out):
        return False
    try:
        index = read_index(out)
    except CTPError:
        return False  # damaged: compressed again and replaced
    source = (index.get("source") or {}).get("spec")
    same = (index.get("config") == cfg.to_dict() and source == model_spec
            and index.get("algorithm_version") == ALGORITHM_VERSION)
    if same:
        print(f"{out} already holds {cfg.label()} of {model_spec}: nothing to do (pass --no-resume to compress again)")
    else:
        logging.getLogger(__name__).warning("%s holds another compressed model (%s of %s); it will be replaced",
                                            out, index.get("label"), source)
    return same


def _warn_if_long(model, cfg, device: str) -> None:
    """On a CPU, say how long calibration will take when it is more than about half an hour."""
    from ctp.compress.registry import needs_calibration

    if str(device).startswith("cuda") or not needs_calibration(cfg):
        return
    params = sum(p.numel() for p in model.parameters())
    # measured: 16 x 512 calibration tokens take about 2 minutes for the 135M default model on one core
    minutes = 2.0 * (cfg.nsamples * cfg.seqlen) / (16 * 512) * (params / 135e6)
    if minutes > 30:
        logging.getLogger("ctp").warning(
            "calibrating on %d x %d tokens on a CPU takes roughly %.0f minutes for this model (measured: 16 x 512 "
            "tokens in about 2 minutes at 135M parameters); --nsamples 16 --seqlen 512 is the CPU demo's setting",
            cfg.nsamples, cfg.seqlen, minutes)


def _mean_weight_error(report) -> float:
    errs = [s["weight_rel_error"] for s in report.linear_stats().values() if "weight_rel_error" in s]
    return sum(errs) / len(errs) if errs else float("nan")


def _bits_explained(cfg, storage: dict) -> str:
    """What the stored bits per compressed weight are made of, e.g. '32-bit kept values + 1-bit mask'."""
    parts = []
    if cfg.quant is not None:
        parts.append(f"{cfg.quant.bits}-bit codes + scales/zeros per group")
    else:
        parts.append(f"{storage.get('dense_dtype', 'float32')} kept values")
    if cfg.prune is not None:
        parts.append("1-bit mask")
    return " + ".join(parts)


def _parse_nm(value: str) -> tuple[int, int]:
    parts = value.split(":")
    try:
        n, m = (int(x) for x in parts)
    except ValueError:
        raise CTPError(f"--nm {value!r} is not of the form N:M", "pass e.g. --nm 2:4") from None
    return n, m


def build_config(args):
    """The :class:`CompressConfig` described by ``--config`` and the flags (flags win)."""
    from ctp.compress.config import CompressConfig

    base = _read_config_file(args.config) if args.config else {}
    base = CompressConfig.from_dict(base).to_dict() if base else {}  # validate the file on its own first
    prune = dict(base.get("prune") or {})
    quant = dict(base.get("quant") or {})
    top = {k: v for k, v in base.items() if k not in ("prune", "quant")}

    require(not (args.sparsity is not None and args.nm is not None),
            "--sparsity and --nm both given", "pass one: --sparsity for unstructured, --nm for N:M")
    if args.sparsity is not None:
        prune.update(sparsity=args.sparsity, prune_n=0, prune_m=0)
    if args.nm is not None:
        n, m = _parse_nm(args.nm)
        prune.update(prune_n=n, prune_m=m)
        prune.pop("sparsity", None)
    if args.bits is not None:
        quant["bits"] = args.bits
    for dest, key in _PRUNE_FLAGS.items():
        if dest != "sparsity" and getattr(args, dest) is not None:
            require(bool(prune), f"--{dest.replace('_', '-')} needs --sparsity or --nm",
                    "say how much to prune")
            prune[key] = getattr(args, dest)
    for dest, key in _QUANT_FLAGS.items():
        if dest != "bits" and getattr(args, dest) is not None:
            flag = "--no-true-sequential" if dest == "true_sequential" else f"--{dest.replace('_', '-')}"
            require(bool(quant), f"{flag} needs --bits", "say how many bits to quantize to")
            quant[key] = getattr(args, dest)
    for key in ("blocksize", "percdamp"):
        value = getattr(args, key)
        if value is not None:
            for section in (prune, quant):
                if section:
                    section[key] = value
    for dest, key in _TOP_FLAGS.items():
        if getattr(args, dest) is not None:
            top[key] = getattr(args, dest)
    require(bool(prune or quant), "nothing to compress",
            "pass --sparsity, --nm and/or --bits (or --config FILE)")
    return CompressConfig.from_dict({**top, "prune": prune or None, "quant": quant or None})


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def run(args) -> int:
    from ctp.compress.artifact import default_dense_dtype, estimate_bytes, save_compressed
    from ctp.compress.checkpoint import ACTIVATIONS_DIR, ENCODED_DIR, checkpoint_dir_for, discard_checkpoint
    from ctp.compress.driver import compress_model
    from ctp.compress.registry import needs_calibration
    from ctp.io import check_free_space, check_output
    from ctp.compress.spill import EncodedBlocks
    from ctp.models.load import load_by_blocks, parse_dtype
    from ctp.models.names import is_compressed_artifact

    require(args.save_dtype in _SAVE_DTYPES, f"unknown --save-dtype {args.save_dtype!r}",
            f"use one of {', '.join(_SAVE_DTYPES)}")
    require(args.calib_batch is None or args.calib_batch >= 1, f"--calib-batch {args.calib_batch} must be at least 1",
            "use e.g. 8, or leave it out")
    cfg = build_config(args)
    out = check_output(args.out, args.model, directory=True)
    require(not (out.exists() and any(out.iterdir()) and not is_compressed_artifact(out)),
            f"{out} is a non-empty directory that is not a ctp compressed model",
            "pass a new or empty directory for --out")

    if args.resume and _already_done(out, cfg, args.model):
        return 0
    # a local safetensors model is read one block at a time (memory grows with a block, not the model); blocks
    # move to --device one by one
    # the embedding stays on disk too: a calibration reads the rows of its tokens alone
    model, tok, info, source = load_by_blocks(args.model, **load_options(args), embeddings=False)
    _warn_if_long(model, cfg, device_of(args))
    dense_dtype = default_dense_dtype(model, source) if args.save_dtype == "auto" else parse_dtype(args.save_dtype)
    # the resumable checkpoint and the artifact both hold the compressed blocks until the artifact is written
    check_free_space(out, 2 * estimate_bytes(model, cfg, dense_dtype), "the compressed model and its checkpoint")
    partial = check_output(checkpoint_dir_for(out), args.model, flag="--out's checkpoint", directory=True)
    spill = None if source is None else EncodedBlocks(partial / ENCODED_DIR, dense_dtype, source)
    acts = partial / ACTIVATIONS_DIR if args.offload_activations else None  # else in memory
    if acts is not None and not needs_calibration(cfg):
        logging.getLogger("ctp").warning("%s runs no calibration: --offload-activations has nothing to keep on disk",
                                         cfg.label())
    report = compress_model(model, tok, cfg, device=device_of(args), progress=not args.quiet,
                            chunk=args.calib_batch, checkpoint_dir=partial, resume=args.resume, source=source,
                            spill=spill, activations_dir=acts)
    storage = save_compressed(model, tok, report, report.compressed, out, dense_dtype=dense_dtype,
                              source=info.to_dict(), encoded=spill)
    discard_checkpoint(partial)
    weights = storage["weights_file_bytes"]
    rows = [
        {"metric": "recipe", "value": report.label},
        {"metric": "model", "value": f"{info.spec} ({info.model_type})"},
        {"metric": "time", "value": f"{report.seconds:.1f} s"},
        *([{"metric": "calibration", "value": f"{cfg.nsamples} x {cfg.seqlen} tokens of {cfg.calib_dataset} train"}]
          if report.calibration.get("data", True) is not None else []),
        {"metric": "compressed linears", "value": f"{len(report.compressed)} ({report.n_params:,} weights)"},
        {"metric": "achieved sparsity", "value": f"{report.sparsity:.4f}"},
        {"metric": "bits", "value": str(report.bits or "-")},
        {"metric": "bits per compressed weight", "value": f"{storage['linear_bits_per_weight']:.3f} "
                                                          f"({_bits_explained(cfg, storage)})"},
        {"metric": "weights on disk", "value": f"{_mb(weights)} (dense part {storage['dense_dtype']})"},
        {"metric": "dense fp16 size",
         "value": f"{_mb(storage['fp16_bytes'])} (x{weights / storage['fp16_bytes']:.3f})"},
        {"metric": f"dense {storage['model_dtype']} size",
         "value": f"{_mb(storage['original_bytes'])} (x{weights / storage['original_bytes']:.3f})"},
        *([{"metric": "mean layer recon error", "value": f"{report.mean_recon_error:.4g}"},
           {"metric": "mean relative recon error", "value": f"{report.mean_rel_error:.4g}"}]
          if report.calibration.get("data", True) is not None else
          [{"metric": "calibration", "value": "none (the method reads the weights alone)"},
           {"metric": "mean relative weight error", "value": f"{_mean_weight_error(report):.4g}"}]),
        {"metric": "saved to", "value": str(out)},
    ]
    print_table(rows, ["metric", "value"])
    return 0
