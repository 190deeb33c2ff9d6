"""Perplexity following the GPTQ protocol, with an optional prompt.

The text of one split is cut into non-overlapping windows of ``seqlen`` tokens;
each window is scored on its own (tokens 2..seqlen given their prefix), and the
perplexity is exp of the mean NLL over all scored tokens. A prompt of k
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
from tqdm.auto import tqdm

from ctp.data.corpora import corpus_ids, eval_windows
from ctp.models.adapter import check_positions
from ctp.distributed import is_main, shard, sum_across, world
from ctp.lm import check_prompt, prompt_length, token_nll


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

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def window_nll(
    model: nn.Module,
    windows: torch.Tensor,
    prompt: torch.Tensor | None = None,
    batch_size: int = 1,
    progress: bool | str = False,
) -> tuple[float, int]:
    """Sum of NLL and number of scored tokens over ``windows`` (n, seqlen).

    In a process group each process scores a contiguous share of the batches
    (the batches one process would form) and every process returns the sums
    over all of them: a collective call, every process must make it.
    """
    device = model.get_input_embeddings().weight.device
    starts = shard(torch.arange(0, windows.shape[0], batch_size)).tolist()  # this process's batches
    total, count = 0.0, 0
    desc = progress if isinstance(progress, str) else "perplexity"
    for start in tqdm(starts, desc=desc, disable=not progress or not is_main(), leave=False, unit="batch"):
        ids = windows[start : start + batch_size].to(device)  # (b, seqlen)
        nll = token_nll(model, ids, prompt)  # (b, seqlen-1)
        total += float(nll.double().sum())
        count += nll.numel()
    if world()[1] > 1:
        total, n = sum_across([total, count], device)
        count = int(n)
    return total, count


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
    check_prompt(model, prompt)
    check_positions(model, seqlen + k, f"a window of {seqlen} tokens" + (f" after a prompt of {k}" if k else ""),
                    "use a shorter --seqlen" + (" or a shorter prompt" if k else ""))
    ids, ref = corpus_ids(dataset, split, tokenizer, source)
    windows = eval_windows(ids, seqlen, max_windows)
    label = f"ppl {ref.name}/{ref.split}" + (f" +prompt({k})" if k else "")
    total, count = window_nll(model, windows, prompt, batch_size, progress=label if progress else False)
    nll = total / count
    return PPLResult(
        dataset=ref.name,
        split=ref.split,
        source=ref.source,
        seqlen=seqlen,
        n_windows=int(windows.shape[0]),
        n_tokens=count,
        nll=nll,
        ppl=math.exp(nll),
        prompt_tokens=k,
        seconds=time.perf_counter() - t0,
    )
