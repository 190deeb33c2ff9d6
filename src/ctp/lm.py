"""A frozen causal LM with a prompt in front: the one place that knows how a prompt enters a model.

Two kinds of prompt, both plain fp32 tensors, told apart by their rank:

* **soft** (the paper): k vectors in the output space of the input-embedding
  module, shape ``(k, hidden)``, prepended to the input embeddings;
* **prefix** (prefix tuning, Li & Liang 2021; PEFT's PrefixTuning layout): k
  keys and values for every decoder layer, shape ``(2, layers, kv_heads, k,
  head_dim)`` (index 0 keys, 1 values), placed in the model's KV cache in front
  of the text. Keys are stored as the attention sees them (after rotary
  embedding, positions 0..k-1), so a prefix initialised from the model's own
  cache of k tokens starts exactly as that hard prompt would.

Either way the text positions are k..k+T-1, the prompt positions are never
scored, and serving costs the same: k extra entries in the KV cache
(:func:`prefix_cache` builds them once; a soft prompt needs one forward for it,
a prefix none). Evaluators, training and generation all go through the
functions here, so none of them needs to know which kind it holds.

**The leading token.** Where the tokenizer starts every text with a BOS (Gemma's
``<bos>``, see :func:`ctp.data.corpora.leading_ids`), inputs carry it as their
first ``lead`` tokens and a prompt takes its place: the prompt's first ``lead``
positions start as the BOS's own (its embedding, or its keys and values) and
learn like the rest, and the text follows without its BOS. The BOS is the
model's attention sink, and a compressed model's sink is damaged too: a prefix
that may re-learn it closed 26% of Gemma 3's 3-bit c4 gap against 11% for a
prefix placed in front of an untouched ``<bos>`` (``bench/prompt_placement.py``).
Scoring skips the first text token as well, with or without a prompt, so both
settings score the same tokens ``input_ids[:, lead + 1:]``.
"""

from __future__ import annotations

import torch
from torch import nn

from tqdm.auto import tqdm

from ctp.distributed import all_reduce_, is_main, shard, world
from ctp.errors import require
from ctp.models.adapter import head_parts

SOFT, PREFIX = "soft", "prefix"
KINDS = (SOFT, PREFIX)


def prompt_kind(prompt: torch.Tensor | None) -> str | None:
    """'soft', 'prefix', or None for no prompt."""
    if prompt is None:
        return None
    return PREFIX if prompt.dim() == 5 else SOFT


def prompt_length(prompt: torch.Tensor | None) -> int:
    """k, the number of positions the prompt occupies in front of the text (0 without a prompt)."""
    if prompt is None:
        return 0
    return int(prompt.shape[-2] if prompt.dim() == 5 else prompt.shape[0])


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    w = model.get_input_embeddings().weight
    return w.device, w.dtype


@torch.no_grad()
def kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the model's KV cache, read from a one-token forward."""
    device, _ = _device_dtype(model)
    cache = model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=True).past_key_values
    keys = [layer.keys for layer in cache.layers]
    return len(keys), int(keys[0].shape[1]), int(keys[0].shape[-1])


def check_prompt(model: nn.Module, prompt: torch.Tensor | None) -> None:
    """Refuse, in one line, a prompt whose shape does not fit ``model``."""
    if prompt is None:
        return
    require(prompt.dim() in (2, 5), f"a prompt of shape {tuple(prompt.shape)} is neither soft (k, hidden) nor "
            "prefix (2, layers, kv_heads, k, head_dim)", "use a prompt written by ctp train-prompt")
    if prompt.dim() == 2:
        hidden = model.get_input_embeddings().weight.shape[1]
        require(prompt.shape[1] == hidden,
                f"the prompt has shape {tuple(prompt.shape)} but the model's hidden size is {hidden}",
                "use a prompt learned for this model")
        return
    want = kv_shape(model)
    got = (int(prompt.shape[1]), int(prompt.shape[2]), int(prompt.shape[4]))
    require(prompt.shape[0] == 2 and got == want,
            f"the prefix prompt has {got[0]} layers x {got[1]} kv heads x head size {got[2]}, "
            f"the model has {want[0]} x {want[1]} x {want[2]}", "use a prefix learned on this base model")


def _as_cache(model: nn.Module, layers: list[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=layers, config=model.config)


def prefix_cache(model: nn.Module, prompt: torch.Tensor | None, batch: int = 1):
    """The KV cache holding the prompt alone for ``batch`` rows, or None without a prompt.

    A soft prompt costs one forward over its k embeddings; a prefix is its own
    cache. Gradients flow into the prompt when grad mode is on, so training and
    evaluation share this function. The cache is new on every call (forwards
    extend it in place).
    """
    if prompt is None:
        return None
    device, dtype = _device_dtype(model)
    k = prompt_length(prompt)
    if prompt.dim() == 5:
        kv = prompt.to(device=device, dtype=dtype)  # (2, L, H, k, D)
        return _as_cache(model, [(kv[0, i].unsqueeze(0).expand(batch, -1, -1, -1),
                                  kv[1, i].unsqueeze(0).expand(batch, -1, -1, -1)) for i in range(kv.shape[1])])
    p = prompt.to(device=device, dtype=dtype).unsqueeze(0).expand(batch, k, -1)  # (batch, k, hidden)
    mask = torch.ones(batch, k, dtype=torch.long, device=device)
    return model(inputs_embeds=p, attention_mask=mask, use_cache=True).past_key_values


def embed_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    prompt: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``inputs_embeds`` (B, k+T, hidden) and ``attention_mask`` (B, k+T) for a soft ``prompt`` (k, hidden) or none.

    The prompt is cast, not detached, so gradients reach it. Without a prompt
    the embeddings of ``input_ids`` are returned alone.
    """
    require(prompt is None or prompt.dim() == 2, "a prefix prompt has no input embeddings",
            "pass it through prompt_inputs")
    tok = model.get_input_embeddings()(input_ids)  # (B, T, hidden)
    mask = _prompt_mask(input_ids, attention_mask, prompt_length(prompt))  # (B, k+T)
    if prompt is None:
        return {"inputs_embeds": tok, "attention_mask": mask}
    p = prompt.to(device=tok.device, dtype=tok.dtype).unsqueeze(0).expand(tok.shape[0], -1, -1)  # (B, k, hidden)
    return {"inputs_embeds": torch.cat([p, tok], dim=1), "attention_mask": mask}  # (B, k+T, hidden), (B, k+T)


def _prompt_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, k: int) -> torch.Tensor:
    """The attention mask of ``k`` prompt positions (ones) followed by the text's (all ones when not given): (B, k+T)."""
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=input_ids.device)
    if not k:
        return attention_mask
    ones = torch.ones(B, k, dtype=attention_mask.dtype, device=attention_mask.device)
    return torch.cat([ones, attention_mask], dim=1)


def prompt_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    prompt: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    lead: int = 0,
) -> tuple[dict, int]:
    """Model keyword arguments for ``input_ids`` (B, T) with ``prompt`` in front, and the logits' offset.

    ``logits[:, offset:]`` are those of the positions of ``input_ids[:, lead:]``.
    With a prompt the first ``lead`` tokens (the BOS) are left out: the prompt
    holds their positions (see the module notes). The attention mask covers
    prompt + text, prompt columns ones. A soft prompt is prepended to the input
    embeddings (offset k); a prefix enters as the KV cache (offset 0); without a
    prompt the offset is ``lead``.
    """
    if prompt is None:
        return embed_inputs(model, input_ids, None, attention_mask), lead
    if lead:
        input_ids = input_ids[:, lead:]
        attention_mask = None if attention_mask is None else attention_mask[:, lead:]
    if prompt.dim() == 2:
        return embed_inputs(model, input_ids, prompt, attention_mask), prompt_length(prompt)
    return {"input_ids": input_ids, "attention_mask": _prompt_mask(input_ids, attention_mask, prompt_length(prompt)),
            "past_key_values": prefix_cache(model, prompt, input_ids.shape[0])}, 0


def text_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    prompt: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    lead: int = 0,
) -> torch.Tensor:
    """Logits at the positions of ``input_ids[:, lead:]`` (B, T-lead, V) with ``prompt`` in front (gradients
    reach the prompt)."""
    kwargs, offset = prompt_inputs(model, input_ids, prompt, attention_mask, lead)
    use_cache = "past_key_values" in kwargs  # a prefix lives in the cache; nothing else needs one
    return model(**kwargs, use_cache=use_cache).logits[:, offset:, :]


# Logits the fused LM head + loss holds at once: chunk x vocab fp32 values, 128 MB (128 positions of Gemma 3's
# 262k vocabulary, 682 of SmolLM2's 49k). Measured (bench/lm_head.py): a training step as fast as with the full
# logits (1.00-1.02x), its peak memory 0.26 GB instead of 1.53 GB on Gemma 3 270M; 2**24 was up to 6% slower.
HEAD_CHUNK_ELEMENTS = 1 << 25


class _HeadNLL(torch.autograd.Function):
    """Next-token NLL through the LM head, a chunk of positions at a time, never holding (N, V) logits.

    The forward computes each chunk's logits, its log-sum-exp and NLL, and (when
    a gradient is wanted) the NLL's gradient with respect to the hidden states,
    ``(softmax - onehot) @ W``, so the chunk's logits are dropped at once; the
    backward only scales that gradient by the incoming one. Same two matmuls as
    the unfused loss, without the (N, V) tensors of logits, log-softmax and
    their gradient (fused linear cross-entropy).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, chunk, need_grad):  # hidden (N, H), targets (N,)
        n = hidden.shape[0]
        nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if need_grad else None
        for s in range(0, n, chunk):
            tgt = targets[s : s + chunk]  # (c,)
            z = nn.functional.linear(hidden[s : s + chunk], weight, bias).float()  # (c, V)
            if softcap is not None:
                t = torch.tanh(z / softcap)
                z = t * softcap
            lse = torch.logsumexp(z, dim=-1)  # (c,)
            nll[s : s + chunk] = lse - z.gather(1, tgt.unsqueeze(1)).squeeze(1)
            if need_grad:
                z.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place
                z[torch.arange(tgt.shape[0], device=z.device), tgt] -= 1
                if softcap is not None:
                    z.mul_(1 - t * t)
                grad[s : s + chunk] = z.to(weight.dtype) @ weight  # (c, H)
        ctx.save_for_backward(grad if need_grad else hidden.new_empty(0))
        return nll

    @staticmethod
    def backward(ctx, g):  # g (N,)
        (grad,) = ctx.saved_tensors
        return grad * g.unsqueeze(1).to(grad.dtype), None, None, None, None, None, None


def head_nll(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Linear, softcap: float | None = None) -> torch.Tensor:
    """Per-position NLL of ``targets`` (...,) under the logits ``cap(head(hidden))``, hidden (..., H): fp32 (...,).

    Equal to cross-entropy on the full logits within fp32 rounding, and so is
    its gradient with respect to ``hidden``; the head's weights get none.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    chunk = max(1, HEAD_CHUNK_ELEMENTS // head.weight.shape[0])
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    nll = _HeadNLL.apply(flat, head.weight, head.bias, targets.reshape(-1), softcap, chunk, need_grad)
    return nll.view(targets.shape)


def token_nll(
    model: nn.Module,
    input_ids: torch.Tensor,
    prompt: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    lead: int = 0,
) -> torch.Tensor:
    """Per-token negative log-likelihood of ``input_ids[:, lead + 1:]`` given what precedes it (and the prompt).

    Shape (B, T-1-lead), fp32. The first text token is never scored, with or
    without a prompt, so both settings score exactly the same tokens (with a
    prompt the first ``lead`` tokens are left out, see the module notes).
    Positions where ``attention_mask`` is 0 get NLL 0. Where the LM head is a
    plain linear layer the loss goes through :func:`head_nll` (the full logits
    never exist); otherwise through the model's own logits.
    """
    targets = input_ids[:, lead + 1:]  # (B, T-1-lead)
    parts = head_parts(model)
    if parts is None:
        logits = text_logits(model, input_ids, prompt, attention_mask, lead)[:, :-1, :].float()  # (B, T-1-lead, V)
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        nll = nll.view_as(targets)
    else:
        body, head, softcap = parts
        kwargs, offset = prompt_inputs(model, input_ids, prompt, attention_mask, lead)
        use_cache = "past_key_values" in kwargs
        hidden = body(**kwargs, use_cache=use_cache).last_hidden_state[:, offset:-1, :]  # (B, T-1-lead, H)
        nll = head_nll(hidden, targets, head, softcap)
    if attention_mask is not None:
        nll = nll * attention_mask[:, lead + 1:].to(nll.dtype)
    return nll


def token_kl(
    model: nn.Module,
    input_ids: torch.Tensor,
    teacher_logp: torch.Tensor,
    prompt: torch.Tensor | None = None,
    teacher_idx: torch.Tensor | None = None,
    lead: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL(teacher || student) and NLL at the scored positions, each (B, T-1-lead), fp32.

    ``teacher_logp`` (B, T-1, V) are the teacher's next-token log-probabilities
    of the same text without a prompt (all of it: the first ``lead`` positions
    are dropped here). With ``teacher_idx`` (B, T-1, K) they are (B, T-1, K),
    the log-probabilities of those K tokens only, and the KL is the one of the
    distributions coarsened to K+1 outcomes: those tokens, and the rest of the
    vocabulary as one. One student forward gives both terms.
    """
    logits = text_logits(model, input_ids, prompt, None, lead)[:, :-1, :].float()  # (B, T-1-lead, V)
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, input_ids[:, lead + 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1-lead)
    teacher_logp = teacher_logp[:, lead:]
    teacher_idx = None if teacher_idx is None else teacher_idx[:, lead:]
    if teacher_idx is None:
        return (teacher_logp.exp() * (teacher_logp - logp)).sum(-1), nll
    student = logp.gather(-1, teacher_idx)  # (B, T-1, K)
    p = teacher_logp.exp()
    kl = (p * (teacher_logp - student)).sum(-1)
    rest_t = (1 - p.sum(-1)).clamp_min(0)  # the teacher's mass outside its top k
    rest_s = (1 - student.exp().sum(-1)).clamp_min(1e-12)
    return kl + torch.xlogy(rest_t, rest_t) - rest_t * rest_s.log(), nll


@torch.no_grad()
def teacher_logprobs(teacher: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The teacher's next-token log-probabilities (B, T-1, V), fp32, on the student's device."""
    device, _ = _device_dtype(teacher)
    logits = teacher(input_ids=input_ids.to(device), use_cache=False).logits[:, :-1, :].float()
    return torch.log_softmax(logits, dim=-1).to(input_ids.device)


@torch.no_grad()
def window_nlls(
    model: nn.Module,
    windows: torch.Tensor,
    prompt: torch.Tensor | None = None,
    batch_size: int = 1,
    progress: bool | str = False,
    lead: int = 0,
) -> torch.Tensor:
    """The NLL sum of each of ``windows`` (n, seqlen) over its tokens lead+2..seqlen: (n,) float64, on the CPU.

    ``lead``: how many leading (BOS) tokens each window starts with (see the module notes).

    In a process group each process scores a contiguous share of the batches
    (the batches one process would form) and every process returns all n sums:
    a collective call, every process must make it.
    """
    device = model.get_input_embeddings().weight.device
    sums = torch.zeros(windows.shape[0], dtype=torch.float64)
    starts = shard(torch.arange(0, windows.shape[0], batch_size)).tolist()  # this process's batches
    desc = progress if isinstance(progress, str) else "perplexity"
    for start in tqdm(starts, desc=desc, disable=not progress or not is_main(), leave=False, unit="batch"):
        ids = windows[start : start + batch_size].to(device)  # (b, seqlen)
        sums[start : start + ids.shape[0]] = token_nll(model, ids, prompt, lead=lead).double().sum(dim=1).cpu()
    if world()[1] > 1:
        sums = all_reduce_(sums.to(device)).cpu()  # each window is filled by exactly one process
    return sums


def window_nll(model: nn.Module, windows: torch.Tensor, prompt: torch.Tensor | None = None, batch_size: int = 1,
               progress: bool | str = False, lead: int = 0) -> tuple[float, int]:
    """Sum of NLL and number of scored tokens over ``windows`` (n, seqlen) (see :func:`window_nlls`)."""
    sums = window_nlls(model, windows, prompt, batch_size, progress, lead)
    return float(sums.sum()), int(windows.shape[0] * (windows.shape[1] - 1 - lead))


@torch.no_grad()
def cache_of_tokens(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's own keys and values of the tokens ``ids`` (k,) at positions 0..k-1: (2, L, H, k, D) fp32.

    A prefix starting here behaves exactly as the hard prompt ``ids`` does.
    """
    device, _ = _device_dtype(model)
    cache = model(input_ids=ids.to(device).unsqueeze(0), use_cache=True).past_key_values
    keys = torch.stack([layer.keys[0] for layer in cache.layers])  # (L, H, k, D)
    values = torch.stack([layer.values[0] for layer in cache.layers])  # (L, H, k, D)
    return torch.stack([keys, values]).float()  # (2, L, H, k, D)


__all__ = ["SOFT", "PREFIX", "KINDS", "prompt_kind", "prompt_length", "kv_shape", "check_prompt", "prefix_cache",
           "embed_inputs", "prompt_inputs", "text_logits", "token_nll", "token_kl", "teacher_logprobs", "cache_of_tokens",
           "window_nlls", "window_nll"]
