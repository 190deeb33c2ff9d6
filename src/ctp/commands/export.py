"""``ctp export``: a ctp-compressed model in the formats other tools load (vLLM, transformers, llama.cpp)."""

from __future__ import annotations

FORMAT_HELP = {
    "compressed-tensors": "directory llm-compressor writes and vLLM serves (pack-quantized int weights)",
    "gptq": "directory in the AutoGPTQ/GPTQModel layout (qweight, qzeros, scales, g_idx; 2, 4 or 8 bits)",
    "gguf": "a llama.cpp .gguf file (4-bit asymmetric groups of 32 -> Q4_1, 8-bit symmetric groups of 32 -> Q8_0)",
    "hf": "the dense rebuild as a plain Hugging Face directory (safetensors)",
}


def register(sub) -> None:
    formats = "; ".join(f"{k}: {v}" for k, v in FORMAT_HELP.items())
    p = sub.add_parser(
        "export", help="write a compressed model for vLLM, transformers, GPTQ tools or llama.cpp",
        description="Write a model made by `ctp compress` in another tool's format. The codes are carried over "
                    "as they are (no re-quantization); a format that cannot hold the model's grid is refused "
                    f"with the format that can. Formats: {formats}.")
    p.add_argument("--model", required=True, help="a directory written by ctp compress")
    p.add_argument("--format", required=True, choices=list(FORMAT_HELP), help="output format")
    p.add_argument("--out", required=True, help="output directory (a .gguf file for --format gguf)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="dtype of the uncompressed tensors and scales (default: the artifact's own; gptq: float16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ctp.commands.common import print_table
    from ctp.errors import CTPError, require
    from ctp.io import check_output
    from ctp.models.load import parse_dtype
    from ctp.models.names import is_compressed_artifact

    require(Path(args.model).is_dir() and is_compressed_artifact(args.model),
            f"{args.model} is not a model written by ctp compress",
            "pass the --out directory of a ctp compress run")
    gguf = args.format == "gguf"
    if gguf:
        require(args.out.endswith(".gguf"), f"--out {args.out} must end in .gguf for --format gguf",
                "pass e.g. --out model-q4_1.gguf")
    out = check_output(args.out, args.model, directory=not gguf)
    if out.exists() and (out.is_file() or any(out.iterdir())) and not args.overwrite:
        raise CTPError(f"--out {out} already exists", "pass another --out, or --overwrite to replace it")
    from ctp.compress.artifact import read_index
    from ctp.compress.formats import export_model
    from ctp.io import check_free_space

    storage = read_index(args.model)["storage"]
    need = 4 * storage.get("n_params", 0) if args.format == "hf" else 2 * storage.get("weights_file_bytes", 0)
    check_free_space(out, need, f"the {args.format} export")
    summary = export_model(args.model, out, args.format, parse_dtype(args.dtype) if args.dtype else None)
    rows = [{"field": k, "value": v} for k, v in summary.items()]
    rows.append({"field": "written to", "value": str(out)})
    print_table(rows, ["field", "value"])
    return 0
