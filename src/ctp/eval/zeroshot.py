"""Zero-shot multiple-choice accuracy by log-likelihood, with an optional prompt.

The protocol is lm-evaluation-harness's ``multiple_choice`` scoring:

* each choice of an item is a request (context, " " + choice); both strings are
  encoded the way lm-eval's ``HFLM`` encodes them (:func:`encode_pair`): trailing
  spaces of the context move to the continuation, ``encode(context +
  continuation)`` is split after ``len(encode(context))`` tokens, so the
  continuation tokens are the tail of the joint encoding;
* the request's log-likelihood is the sum of log-softmax of the continuation
  tokens given everything before them (left-truncated to ``max_length``);
* ``acc`` takes the argmax of the summed log-likelihoods, ``acc_norm`` the argmax
  of log-likelihood divided by the choice's length in characters (lm-eval's
  ``acc_norm``: ``len(choice)`` without the leading space; identical to byte length
  for ASCII text); ties go to the first choice, as with ``np.argmax``;
* standard errors are lm-eval's ``mean_stderr``: the sample standard deviation
  (n-1) of the per-item 0/1 scores over sqrt(n), i.e. sqrt(p(1-p)/(n-1)).

Requests are scored in batches of right-padded sequences with an attention
mask, longest first. Requests whose input tokens are identical (the choices
" A".." D" of one MMLU item, say) share one forward, and only the positions
that predict continuation tokens go through the LM head. A prompt (soft, hard
or prefix, see :mod:`ctp.lm`) sits before every request: its keys and values are
computed once and reused by every batch (or, with ``prefix_cache=False``, it is
put in front through :func:`ctp.lm.prompt_inputs` each time; the numbers agree).
It is never scored, and the scored tokens are the same with and without it.

``limit`` takes the first N items of a task's split (lm-eval's ``--limit``), so
results with the same limit always cover the same items.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ctp.data.corpora import leading_ids
from ctp.errors import CTPError, require
from ctp.eval.tasks import Item, get_task, load_items
from ctp.eval.stats import mean_stderr
from ctp.lm import check_prompt, prefix_cache as build_prefix_cache, prompt_inputs, prompt_length
from ctp.models.adapter import check_positions, forward_accepts

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither the config nor the tokenizer says


@dataclass
class TaskResult:
    task: str
    n: int
    acc: float
    acc_stderr: float | None  # None when n < 2
    acc_norm: float
    acc_norm_stderr: float | None
    prompt_tokens: int = 0
    seconds: float = 0.0
    split: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- tokenisation


def _encode(tokenizer, text: str) -> list[int]:
    """``tokenizer.encode`` with the tokenizer's own special-token default (lm-eval's ``tok_encode``)."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-eval's ``HFLM`` builds them for a causal model."""
    if not context:  # lm-eval conditions on a single prefix token (BOS, else EOS)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def model_max_length(model: nn.Module, tokenizer=None) -> int:
    """The context length lm-eval's ``HFLM`` uses for a model (config, then tokenizer, then 2048)."""
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    if isinstance(v, int) and 0 < v < 10**9:
        return v
    return DEFAULT_MAX_LENGTH


# ----------------------------------------------------------------------------- scoring kernel


@torch.inference_mode()
def score_token_requests(
    model: nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    prompt: torch.Tensor | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    pad_id: int = 0,
    progress: bool | str = False,
    prefix_cache: bool = True,
    return_greedy: bool = False,
    lead: Sequence[int] = (),
) -> list[float] | list[tuple[float, bool]]:
    """Summed log-likelihood of each continuation given its context, in request order.

    With ``return_greedy`` each entry is ``(log-likelihood, is_greedy)`` as lm-eval's
    ``loglikelihood`` returns it: whether every continuation token is the argmax.

    ``requests`` are (context_ids, continuation_ids) pairs. Each is scored on
    ``(context + continuation)[-(L+1):][:-1]`` with ``L = max_length - k`` (k the
    prompt length): lm-eval's left truncation, the prompt taking its share of
    the window. Sequences are right-padded per batch; only the positions that
    predict continuation tokens go through the LM head (``logits_to_keep``).
    With ``prefix_cache`` the prompt's keys and values are computed once and
    reused by every batch (the same numbers as prepending it each time, tested);
    otherwise the prompt is prepended through ``prompt_inputs``. ``lead`` are the
    tokenizer's leading ids (its BOS, :func:`ctp.data.corpora.leading_ids`): with a
    prompt, an input that starts with them loses them, the prompt taking their
    place (see :mod:`ctp.lm`).
    """
    require(batch_size >= 1, f"batch size must be >= 1, got {batch_size}")
    check_prompt(model, prompt)
    k = prompt_length(prompt)
    window = max_length or model_max_length(model)
    budget = window - k
    require(budget >= 1, f"a prompt of {k} tokens leaves no room in a {window}-token window")

    rows, targets = _dedupe(requests, budget, list(lead) if prompt is not None else [])
    order = sorted(rows, key=lambda r: (-len(r), r))  # longest first: padding stays small, OOM shows early
    cache = build_prefix_cache(model, prompt) if prefix_cache else None
    keep_positions = forward_accepts(model, "logits_to_keep")
    out: list = [0.0] * len(requests)
    desc = progress if isinstance(progress, str) else "loglikelihood"
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False,
                      unit="batch"):
        batch = order[start:start + batch_size]
        # Text positions whose logits predict a continuation token, over the whole batch.
        needed = sorted({p for row in batch for i in rows[row] for p in range(len(row) - len(targets[i]), len(row))})
        column = {p: j for j, p in enumerate(needed)}
        logits = _batch_logits(model, batch, pad_id, prompt, cache, needed, keep_positions)  # (b, len(needed), V)
        for r, row in enumerate(batch):
            for i in rows[row]:
                cont = targets[i]
                cols = [column[p] for p in range(len(row) - len(cont), len(row))]
                logp = torch.log_softmax(logits[r, cols].float(), dim=-1)  # (c, V)
                tgt = torch.tensor(cont, device=logp.device).unsqueeze(1)  # (c, 1)
                ll = float(logp.gather(1, tgt).sum())
                out[i] = (ll, bool((logp.argmax(-1) == tgt.squeeze(1)).all())) if return_greedy else ll
    return out


def _dedupe(requests: Sequence[tuple[Sequence[int], Sequence[int]]], budget: int, lead: list[int]):
    """({input row: indices of the requests it scores}, continuation of each request): identical inputs share
    one forward, each left-truncated to ``budget + 1`` tokens with the continuation, then without ``lead`` where
    it starts with it and a context token follows."""
    n = len(lead)
    rows: dict[tuple[int, ...], list[int]] = {}
    targets: list[list[int]] = []
    for i, (ctx, cont) in enumerate(requests):
        cont = list(cont)
        if not cont:
            raise CTPError("a continuation encodes to no tokens", "check the task's choices")
        require(len(cont) <= budget, f"a continuation of {len(cont)} tokens exceeds the {budget}-token window")
        row = (list(ctx) + cont)[-(budget + 1):][:-1]
        if n and row[:n] == lead and len(row) - n >= len(cont):
            row = row[n:]
        rows.setdefault(tuple(row), []).append(i)
        targets.append(cont)
    return rows, targets


def _batch_logits(model: nn.Module, batch: list[tuple[int, ...]], pad_id: int, prompt: torch.Tensor | None,
                  cache, needed: list[int], keep_positions: bool) -> torch.Tensor:
    """Logits (b, len(needed), V) at the text positions ``needed`` of the right-padded ``batch``, the prompt in
    front from its cache (``cache``) or prepended."""
    device = model.get_input_embeddings().weight.device
    b, T = len(batch), len(batch[0])
    ids = torch.full((b, T), pad_id, dtype=torch.long)  # (b, T), right-padded
    mask = torch.zeros((b, T), dtype=torch.long)
    for r, row in enumerate(batch):
        ids[r, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, :len(row)] = 1
    ids, mask = ids.to(device), mask.to(device)
    if cache is not None:
        past = copy.deepcopy(cache)
        past.batch_repeat_interleave(b)
        k = prompt_length(prompt)
        kwargs = dict(input_ids=ids, past_key_values=past, use_cache=True,
                      attention_mask=torch.cat([torch.ones(b, k, dtype=mask.dtype, device=device), mask], 1))
        offset = 0  # logits cover the text positions only
    else:
        kwargs, offset = prompt_inputs(model, ids, prompt, mask)  # offset: logits cover prompt + text positions
        kwargs["use_cache"] = "past_key_values" in kwargs
    if keep_positions:
        kwargs["logits_to_keep"] = torch.tensor(needed, device=device) + offset
        return model(**kwargs).logits
    return model(**kwargs).logits[:, offset:, :][:, needed, :]


def loglikelihoods(
    model: nn.Module,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    prompt: torch.Tensor | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool | str = False,
    prefix_cache: bool = True,
) -> list[float]:
    """log p(continuation | context) for string pairs (lm-eval's ``loglikelihood`` without is_greedy)."""
    reqs = [encode_pair(tokenizer, c, x) for c, x in pairs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return score_token_requests(model, reqs, prompt, batch_size, max_length or model_max_length(model, tokenizer),
                                pad, progress, prefix_cache, lead=leading_ids(tokenizer))


# ----------------------------------------------------------------------------- metrics


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties (as np.argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def item_scores(items: Sequence[Item], lls: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    """Per-item acc and acc_norm (0/1) from the log-likelihoods of each item's choices."""
    acc, acc_norm = [], []
    for item, ll in zip(items, lls, strict=True):
        require(len(ll) == len(item.choices), "one log-likelihood per choice expected")
        acc.append(float(_argmax(ll) == item.gold))
        normed = [x / max(len(c), 1) for x, c in zip(ll, item.choices)]
        acc_norm.append(float(_argmax(normed) == item.gold))
    return acc, acc_norm


def summarize(task: str, items: Sequence[Item], lls: Sequence[Sequence[float]], prompt_tokens: int = 0,
              seconds: float = 0.0, split: str = "") -> TaskResult:
    """acc, acc_norm and their standard errors over ``items``."""
    acc, acc_norm = item_scores(items, lls)
    n = len(acc)
    require(n > 0, f"task {task}: no items to score")
    return TaskResult(task=task, n=n, acc=sum(acc) / n, acc_stderr=mean_stderr(acc), acc_norm=sum(acc_norm) / n,
                      acc_norm_stderr=mean_stderr(acc_norm), prompt_tokens=prompt_tokens, seconds=seconds,
                      split=split)


# ----------------------------------------------------------------------------- tasks


def score_items(
    model: nn.Module,
    tokenizer,
    items: Sequence[Item],
    prompt: torch.Tensor | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool | str = False,
) -> list[list[float]]:
    """Log-likelihood of every choice of every item, shape [n_items][n_choices]."""
    pairs = [(it.context, cont) for it in items for cont in it.continuations()]
    flat = loglikelihoods(model, tokenizer, pairs, prompt, batch_size, max_length, progress)
    out, pos = [], 0
    for it in items:
        out.append(flat[pos:pos + len(it.choices)])
        pos += len(it.choices)
    return out


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    prompt: torch.Tensor | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    max_length: int | None = None,
) -> list[TaskResult]:
    """Zero-shot acc / acc_norm of ``model`` (with ``prompt`` prepended, if given) on each task.

    ``limit`` scores the first N items of each task's split. Unknown task names
    raise CTPError before anything is scored.
    """
    specs = [get_task(t) for t in tasks]
    k = prompt_length(prompt)
    require(limit is None or limit >= 1, f"limit {limit} must be at least 1", "pass --limit 1 or more, or none")
    require(batch_size >= 1, f"batch size {batch_size} must be at least 1", "pass --batch-size 1 or more")
    if max_length is not None:
        require(max_length > k, f"max length {max_length} leaves no room after a prompt of {k} tokens",
                f"pass --max-length above {k}, or leave it out for the model's own")
        check_positions(model, max_length, f"max length {max_length}", "pass a smaller --max-length, or leave it out")
    was_training = model.training
    model.eval()
    results = []
    try:
        for spec in specs:
            t0 = time.perf_counter()
            items = load_items(spec.name, limit)
            label = f"{spec.name}" + (f" +prompt({k})" if k else "")
            lls = score_items(model, tokenizer, items, prompt, batch_size, max_length, label if progress else False)
            res = summarize(spec.name, items, lls, k, time.perf_counter() - t0, spec.split)
            log.info("%s: n=%d acc=%.4f acc_norm=%.4f (%.1fs)", res.task, res.n, res.acc, res.acc_norm, res.seconds)
            results.append(res)
    finally:
        model.train(was_training)
    return results
