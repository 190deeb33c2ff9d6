"""Peak memory of a compression: the whole model in memory against one block at a time.

Builds a random-weight Llama-shaped model (``--hidden`` x ``--layers``, intermediate 2.75x, 32k vocabulary,
untied head), saves it in fp16 safetensors shards, then compresses it in a fresh child process per run and
records the child's peak resident set size (``VmHWM``) against the model's fp16 size:

* ``whole``: today's path for models that fit, ``load_model`` + ``compress_model`` + ``save_compressed``;
* ``blocks``: what ``ctp compress`` does for a local safetensors model, ``load_by_blocks`` (blocks read from
  the shards when compressed) + ``EncodedBlocks`` (finished blocks encoded to disk) + a streamed artifact.

* ``offload``: ``blocks`` with the calibration activations on disk, one ``--calib-batch`` of windows in memory
  at a time (``ctp compress --offload-activations``).

All run resumable, with a compression checkpoint beside the output, as ``ctp compress`` does.

All runs store the dense parts in fp16 (``ctp compress --save-dtype auto``). The calibration activations
(``nsamples x seqlen x hidden`` fp32, twice: inputs and outputs of a block) are reported beside the figures.

    python -m bench.compress_memory --threads 1 --hidden 2048 --layers 24 --recipes rtn,gptq --modes whole,blocks
"""

from __future__ import annotations

import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench._common import base_parser, finish, headline, machine, setup, table

RECIPES = {
    "rtn": {"quant": {"method": "rtn", "bits": 4, "group_size": 64}},
    "gptq": {"quant": {"bits": 4, "group_size": 64}},
    "sparsegpt": {"prune": {"sparsity": 0.5}},
}


def build_model(hidden: int, layers: int, out: Path) -> int:
    """Save a random Llama of this size in fp16 shards of about 500 MB; returns its fp16 bytes."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ctp.models.load import load_tokenizer

    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    for p in model.parameters():  # the default init is slow and irrelevant: N(0, 0.02), norms at 1
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    model.save_pretrained(out, max_shard_size="500MB")
    tok = load_tokenizer("smollm2-135m")  # 49k ids: any id the calibration text gives must fit the 32k table
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    return 2 * n


def peak_rss() -> int:
    """This process's peak resident set size since its ``exec`` (``VmHWM``). Not ``ru_maxrss``: on Linux that
    keeps the high-water mark of the parent's pages shared at ``fork``, so a child of a big process reads big."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(mode: str, src: str, out: str, recipe: str, nsamples: int, seqlen: int, threads: int,
          calib_batch: int = 8) -> dict[str, Any]:
    """One compression in this (fresh) process; returns its peak RSS and time."""
    torch.set_num_threads(threads)
    from ctp.compress.artifact import default_dense_dtype, save_compressed
    from ctp.compress.checkpoint import ACTIVATIONS_DIR, ENCODED_DIR, checkpoint_dir_for
    from ctp.compress.config import CompressConfig
    from ctp.compress.driver import compress_model
    from ctp.compress.spill import EncodedBlocks
    from ctp.models.load import load_by_blocks, load_model

    cfg = CompressConfig.from_dict({**RECIPES[recipe], "nsamples": nsamples, "seqlen": seqlen})
    ids = torch.randint(0, 32000, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    rss_start = peak_rss()
    if mode == "whole":
        model, tok, _ = load_model(src)
        source = spill = None
    else:
        model, tok, _, source = load_by_blocks(src, embeddings=False)  # as ctp compress does
        assert source is not None
    dense_dtype = default_dense_dtype(model, source)
    partial = checkpoint_dir_for(out)  # resumable, as `ctp compress` runs it (its memory included)
    if mode in ("blocks", "offload"):
        spill = EncodedBlocks(partial / ENCODED_DIR, dense_dtype, source)
    report = compress_model(model, tok, cfg, device="cpu", calib_ids=ids, progress=False, source=source, spill=spill,
                            checkpoint_dir=partial, chunk=calib_batch,
                            activations_dir=partial / ACTIVATIONS_DIR if mode == "offload" else None)
    storage = save_compressed(model, tok, report, out, dense_dtype=dense_dtype, encoded=spill)
    return {"mode": mode, "recipe": recipe, "seconds": time.perf_counter() - t0,
            "peak_rss_bytes": peak_rss(),
            "rss_after_imports_bytes": rss_start, "artifact_bytes": storage["weights_file_bytes"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--recipes", default="rtn,gptq", help=f"comma separated, of {', '.join(RECIPES)}")
    p.add_argument("--modes", default="whole,blocks",
                   help="whole, blocks, offload (blocks with the calibration activations on disk: "
                        "ctp compress --offload-activations)")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib-batch", type=int, default=8,
                   help="calibration windows per block forward (ctp compress --calib-batch; default 8)")
    p.add_argument("--workdir", default=None, help="where the model and artifacts go (default: a temporary dir)")
    p.add_argument("--child", default=None, help="(internal) JSON arguments of one child run")
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(**json.loads(args.child))))
        return {}
    setup(args)
    t_start = time.perf_counter()
    result: dict[str, Any] = {"bench": "compress_memory", "machine": machine(), "device": "cpu", "args": vars(args)}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src = Path(tmp) / "model"
        fp16 = build_model(args.hidden, args.layers, src)
        shards = sorted(src.glob("*.safetensors"))
        result["model"] = {"fp16_bytes": fp16, "shards": len(shards), "hidden": args.hidden, "layers": args.layers,
                           "calibration_activation_bytes": 2 * args.nsamples * args.seqlen * args.hidden * 4}
        rows = []
        for recipe in args.recipes.split(","):
            for mode in args.modes.split(","):
                spec = {"mode": mode, "src": str(src), "out": str(Path(tmp) / f"{mode}-{recipe}"),
                        "recipe": recipe, "nsamples": args.nsamples, "seqlen": args.seqlen,
                        "threads": args.threads or 1, "calib_batch": args.calib_batch}
                proc = subprocess.run([sys.executable, "-m", "bench.compress_memory", "--child", json.dumps(spec)],
                                      capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise SystemExit(f"{mode}/{recipe} failed:\n{proc.stderr[-3000:]}")
                row = json.loads(line[7:])
                row["peak_rss_vs_fp16"] = row["peak_rss_bytes"] / fp16
                act = result["model"]["calibration_activation_bytes"] if recipe != "rtn" else 0
                row["peak_minus_activations_vs_fp16"] = (row["peak_rss_bytes"] - act) / fp16
                rows.append(row)
                logging.info("%s %s: peak RSS %.2f GB (%.3fx fp16) in %.0f s", mode, recipe,
                             row["peak_rss_bytes"] / 1e9, row["peak_rss_vs_fp16"], row["seconds"])
        result["runs"] = rows
        modes = args.modes.split(",")
        if len(modes) > 1:  # the same weights every way
            from ctp.compress.artifact import load_compressed

            same = {}
            for recipe in args.recipes.split(","):
                a = load_compressed(Path(tmp) / f"{modes[0]}-{recipe}")[0].state_dict()
                for mode in modes[1:]:
                    b = load_compressed(Path(tmp) / f"{mode}-{recipe}")[0].state_dict()
                    same[f"{recipe} ({modes[0]} vs {mode})"] = set(a) == set(b) and all(torch.equal(a[k], b[k])
                                                                                       for k in a)
                    del b
                del a
            result["bit_identical"] = same
    return finish(result, args, t_start, report)


def report(r: dict[str, Any]) -> str:
    m = r["model"]
    parts = [headline("compress_memory", r),
             f"model: random Llama {m['layers']} x {m['hidden']}, fp16 {m['fp16_bytes'] / 1e9:.2f} GB in "
             f"{m['shards']} shards; calibration activations {m['calibration_activation_bytes'] / 1e6:.0f} MB "
             f"(GPTQ/SparseGPT only)",
             table(r["runs"], ["mode", "recipe", "seconds", "peak_rss_bytes", "peak_rss_vs_fp16",
                               "peak_minus_activations_vs_fp16", "rss_after_imports_bytes", "artifact_bytes"],
                   "peak resident memory of one compression (child process, VmHWM)")]
    if "bit_identical" in r:
        parts.append("artifacts bit-identical: " + ", ".join(f"{k} {v}" for k, v in r["bit_identical"].items()))
    parts.append(f"wall time {r['wall_s']:.0f}s")
    return "\n\n".join(parts)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
