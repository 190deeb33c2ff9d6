"""Peak memory of a compression: the whole model in memory against one block at a time.

Builds a random-weight Llama-shaped model (``--hidden`` x ``--layers``, intermediate 2.75x, 32k vocabulary,
untied head), saves it in fp16 safetensors shards, then compresses it in a fresh child process per run and
records the child's peak resident set size (``VmHWM``) against the model's fp16 size:

* ``whole``: today's path for models that fit, ``load_model`` + ``compress_model`` + ``save_compressed``;
* ``blocks``: what ``ctp compress`` does for a local safetensors model, ``load_by_blocks`` (blocks read from
  the shards when compressed) + ``EncodedBlocks`` (finished blocks encoded to disk) + a streamed artifact.

* ``offload``: ``blocks`` with the calibration activations on disk, one ``--calib-batch`` of windows in memory
  at a time (``ctp compress --offload-activations``).

With ``--stages`` each child also samples its resident set every few milliseconds and reports the highest
reading in each stage of a block's work (the Hessian pass, each linear's kernel by weight shape, the pass that
makes the next block's inputs, the block's other steps, between blocks), the largest over all blocks: where the
peak is.

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


def _status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (``VmHWM``, ``VmRSS``) as bytes, or None where there is none."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return None


def peak_rss() -> int:
    """This process's peak resident set size since its ``exec`` (``VmHWM``). Not ``ru_maxrss``: on Linux that
    keeps the high-water mark of the parent's pages shared at ``fork``, so a child of a big process reads big."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    return _status_bytes("VmRSS") or 0


class StageSampler:
    """The highest resident set seen in each stage of the driver's block loop: a thread reads ``VmRSS`` every
    ``period`` seconds under the label of the step running (the driver's steps are wrapped for the while; their
    results are untouched). ``peaks``: stage -> [bytes, block where it was highest]."""

    def __init__(self, period: float = 0.003):
        import threading

        self.period, self.stage, self.block = period, "before the blocks", -1
        self.peaks: dict[str, list[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, stage = current_rss(), self.stage
            if rss > self.peaks.setdefault(stage, [0, self.block])[0]:
                self.peaks[stage] = [rss, self.block]
            self._stop.wait(self.period)

    def _label(self, stage, fn, block_arg: int | None = None, after: str = "between blocks"):
        def wrapped(*a, **k):
            if block_arg is not None:
                self.block = a[block_arg]
            self.stage = stage(a) if callable(stage) else stage
            try:
                return fn(*a, **k)
            finally:
                self.stage = after

        return wrapped

    def __enter__(self) -> "StageSampler":
        import ctp.compress.driver as D

        self._saved = {n: getattr(D, n) for n in ("_compress_one_block", "_collect_hessians", "compress_weight",
                                                   "_run_block")}
        # "block at work": the block's other steps (reading it, rebuilding and encoding its weights at the end)
        D._compress_one_block = self._label("block at work", D._compress_one_block, block_arg=2)
        D._collect_hessians = self._label("Hessian pass", D._collect_hessians, after="block at work")
        D.compress_weight = self._label(lambda a: f"kernel {tuple(a[0].shape)}", D.compress_weight,
                                        after="block at work")
        D._run_block = self._label("next block's inputs", D._run_block, after="block at work")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import ctp.compress.driver as D

        self._stop.set()
        self._thread.join()
        for n, fn in self._saved.items():
            setattr(D, n, fn)


def child(mode: str, src: str, out: str, recipe: str, nsamples: int, seqlen: int, threads: int,
          calib_batch: int = 8, stages: bool = False) -> dict[str, Any]:
    """One compression in this (fresh) process; returns its peak RSS and time (and with ``stages`` the peak of
    each stage, :class:`StageSampler`)."""
    from contextlib import nullcontext

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
    with StageSampler() if stages else nullcontext() as sampler:
        report = compress_model(model, tok, cfg, device="cpu", calib_ids=ids, progress=False, source=source,
                                spill=spill, checkpoint_dir=partial, chunk=calib_batch,
                                activations_dir=partial / ACTIVATIONS_DIR if mode == "offload" else None)
    storage = save_compressed(model, tok, report, out, dense_dtype=dense_dtype, encoded=spill)
    row = {"mode": mode, "recipe": recipe, "seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss(),
           "rss_after_imports_bytes": rss_start, "artifact_bytes": storage["weights_file_bytes"]}
    if sampler is not None:
        row["stages"] = [{"stage": k, "peak_rss_bytes": v[0], "block": v[1]} for k, v in sampler.peaks.items()]
    return row


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
    p.add_argument("--stages", action="store_true",
                   help="also report the peak of each stage of a block's work (RSS sampled every 3 ms)")
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
                        "threads": args.threads or 1, "calib_batch": args.calib_batch, "stages": args.stages}
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
    for row in r["runs"]:
        if "stages" in row:
            parts.append(table(row["stages"], ["stage", "peak_rss_bytes", "block"],
                               f"{row['mode']} {row['recipe']}: highest resident set in each stage"))
    if "bit_identical" in r:
        parts.append("artifacts bit-identical: " + ", ".join(f"{k} {v}" for k, v in r["bit_identical"].items()))
    parts.append(f"wall time {r['wall_s']:.0f}s")
    return "\n\n".join(parts)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
