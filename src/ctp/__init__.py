"""ctp: compress a causal language model, then learn a soft prompt that recovers its quality.

The Python API mirrors the CLI, one function per stage::

    import ctp

    model, tok, info = ctp.load_model("smollm2-135m")
    report = ctp.compress_model(model, tok, ctp.CompressConfig.from_dict(
        {"prune": {"method": "sparsegpt", "sparsity": 0.5}, "quant": {"bits": 4, "group_size": 64}}))
    ctp.save_compressed(model, tok, report, out_dir="sp50q4")
    prompt, history = ctp.train_prompt(model, tok, info, ctp.PromptConfig(num_tokens=25),
                                       ctp.TrainConfig.cpu_demo(), out_path="sp50q4.prompt.safetensors")
    print(ctp.perplexity(model, tok, "wikitext2", "test", seqlen=512, prompt=prompt.embeddings).ppl)

Heavy modules load on first use, so ``import ctp`` is cheap.
"""

from ctp.errors import CTPError

__version__ = "0.1.0"

_LAZY = {
    "load_model": "ctp.models.load",
    "load_by_blocks": "ctp.models.load",
    "CompressConfig": "ctp.compress.config",
    "PruneConfig": "ctp.compress.config",
    "QuantConfig": "ctp.compress.config",
    "compress_model": "ctp.compress.driver",
    "save_compressed": "ctp.compress.artifact",
    "EncodedBlocks": "ctp.compress.spill",
    "discard_checkpoint": "ctp.compress.checkpoint",
    "load_compressed": "ctp.compress.artifact",
    "PromptConfig": "ctp.prompt.soft",
    "TrainConfig": "ctp.prompt.train",
    "train_prompt": "ctp.prompt.train",
    "Teacher": "ctp.prompt.teacher",
    "save_prompt": "ctp.prompt.artifact",
    "load_prompt": "ctp.prompt.artifact",
    "hard_prompt": "ctp.prompt.embed",
    "prompt_embeds": "ctp.prompt.embed",
    "export_model": "ctp.compress.formats",
    "generate": "ctp.prompt.generate",
    "perplexity": "ctp.eval.perplexity",
    "evaluate_tasks": "ctp.eval.zeroshot",
    "measure_latency": "ctp.eval.latency",
    "load_experiment": "ctp.experiments.config",
    "run_experiment": "ctp.experiments.runner",
}

__all__ = ["CTPError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ctp' has no attribute {name!r}")
