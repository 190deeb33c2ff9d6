"""Perplexity following the GPTQ protocol, with an optional prompt.

The text of one split is cut into non-overlapping windows of ``seqlen`` tokens;
each window is scored on its own (tokens 2..seqlen given their prefix), and the
perplexity is exp of the mean NLL over all scored tokens. Its 95% confidence
interval treats the windows as the sample: a t interval of the mean of the
per-window NLLs, mapped through exp; the per-window NLLs are returned too, so
two settings scored on the same windows can be compared pairwise
(:mod:`ctp.eval.stats`). A prompt of k
embeddings is prepended to every window; it is not scored and the scored
tokens are the same with and without it, so the two numbers compare directly.

Under a launcher (``accelerate launch``, ``torchrun``) the batches of windows
are split across the processes and the NLL sums and token counts added up:
each window is scored in the same batch as with one process, so every process
returns the perplexity one process would, up to the order of the float64 sums.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from ctp.data.corpora import corpus_ids, eval_windows, leading_ids
from ctp.models.adapter import check_positions
from ctp.errors import require
from ctp.eval.stats import mean_ci
from ctp.lm import check_prompt, prompt_length, window_nlls


@dataclass
class PPLResult:
    dataset: str
    split: str
    source: str
    seqlen: int
    n_windows: int
    n_tokens: int  # tokens scored
    nll: float  # mean NLL per scored token (nats)
    ppl: float
    prompt_tokens: int = 0
    seconds: float = 0.0
    nll_stderr: float = 0.0  # standard error of the mean NLL over windows
    ppl_low: float = 0.0  # 95% confidence interval of the perplexity (t interval of the windows' mean NLL)
    ppl_high: float = 0.0
    window_nll: list[float] | None = None  # mean NLL of each window, in order (for paired comparisons)

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity(
    model: nn.Module,
    tokenizer,
    dataset: str = "wikitext2",
    split: str = "test",
    seqlen: int = 1024,
    prompt: torch.Tensor | None = None,
    batch_size: int = 1,
    max_windows: int | None = None,
    source: str = "local",
    progress: bool = True,
) -> PPLResult:
    """Perplexity of ``model`` (with ``prompt`` prepended, if given) on one split of a corpus."""
    t0 = time.perf_counter()
    k = prompt_length(prompt)
    require(max_windows is None or max_windows >= 1, f"max windows {max_windows} must be at least 1",
            "pass --max-windows 1 or more, or leave it out for the whole split")
    require(batch_size >= 1, f"batch size {batch_size} must be at least 1", "pass --batch-size 1 or more")
    require(seqlen >= 2, f"seqlen {seqlen} is too short", "pass --seqlen 2 or more")
    check_prompt(model, prompt)
    check_positions(model, seqlen + k, f"a window of {seqlen} tokens" + (f" after a prompt of {k}" if k else ""),
                    "use a shorter --seqlen" + (" or a shorter prompt" if k else ""))
    ids, ref = corpus_ids(dataset, split, tokenizer, source)
    lead = leading_ids(tokenizer)
    windows = eval_windows(ids, seqlen, max_windows, lead=lead)
    label = f"ppl {ref.name}/{ref.split}" + (f" +prompt({k})" if k else "")
    sums = window_nlls(model, windows, prompt, batch_size, progress=label if progress else False,
                       lead=len(lead))  # (n,)
    per_window = sums / scored_tokens(seqlen, len(lead))
    return PPLResult(dataset=ref.name, split=ref.split, source=ref.source, seqlen=seqlen, prompt_tokens=k,
                     seconds=time.perf_counter() - t0, **window_summary(per_window.tolist(), seqlen, len(lead)))


def scored_tokens(seqlen: int, lead: int = 0) -> int:
    """The tokens a window of ``seqlen`` scores: all but its first text token and its ``lead`` (BOS) tokens."""
    return seqlen - 1 - lead


def window_summary(window_nll: list[float], seqlen: int, lead: int = 0) -> dict:
    """The perplexity fields of windows of ``seqlen`` tokens (``lead`` of them a BOS) whose mean NLLs are
    ``window_nll``.

    The windows of a split are a prefix of its windows, so the first n of a
    result's ``window_nll`` give exactly the result of ``max_windows=n``.
    """
    n = len(window_nll)
    nll = math.fsum(window_nll) / n  # every window scores as many tokens: the token mean is the window mean
    se, low, high = mean_ci(window_nll)
    return {"n_windows": n, "n_tokens": n * scored_tokens(seqlen, lead), "nll": nll, "ppl": math.exp(nll), "nll_stderr": se,
            "ppl_low": math.exp(min(low, 700)), "ppl_high": math.exp(min(high, 700)), "window_nll": list(window_nll)}
