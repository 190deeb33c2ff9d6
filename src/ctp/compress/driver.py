"""The layer-by-layer compression driver: one sequential pipeline for every architecture.

``compress_model`` walks the decoder blocks in order, the way SparseGPT and GPTQ do:

1. draw ``cfg.nsamples`` calibration windows of ``cfg.seqlen`` tokens;
2. run the model's forward once per chunk of windows with every decoder block's
   ``forward`` temporarily replaced by a *catcher* that records the block's inputs
   (hidden states of block 0, and the positional/keyword arguments of each block:
   attention mask, position ids, rotary ``position_embeddings``...) and passes the
   hidden states through unchanged; the catcher of the last block stops the forward,
   so the LM head never runs. Recording per block matters for families whose blocks
   differ (Gemma 3 alternates sliding-window and global attention, each with its own
   mask and rotary table);
3. for each block: move only that block to the compute device (every other block stays
   where it is, so a model larger than the device compresses), hook its linear layers
   to accumulate their input Hessians ``H = 2/n sum x x^T`` (fp32), run the block on
   all calibration inputs, compress each linear with
   :func:`ctp.compress.registry.compress_weight` and write the result back. With
   ``cfg.quant.true_sequential`` the linears are compressed group by group in
   execution order (:func:`ctp.models.adapter.sequential_groups`), re-running the block
   between groups so later groups see the compressed earlier ones; otherwise all of
   them are compressed from one pass (SparseGPT's reference behaviour, and always for
   pruning alone);
4. re-run the compressed block on its inputs: those outputs feed the next block, so
   every block is calibrated on what the compressed model actually produces;
5. with a ``checkpoint_dir``, save the block's compressed weights, its report entry and
   the next block's inputs (:mod:`ctp.compress.checkpoint`): a run killed at any point
   and started again with the same model, config and calibration data continues after
   the last saved block and ends with the same weights and report, bit for bit.

Architecture differences come only from :mod:`ctp.models.adapter`; nothing here names a
model class. GPT-2's ``Conv1D`` sees the same ``(..., in_features)`` input as
``nn.Linear`` and is read and written through ``weight_matrix`` / ``set_weight_matrix``.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ctp.compress.config import CompressConfig
from ctp.compress.report import CompressionReport
from ctp.compress.kernels import accumulate_hessian, accumulate_sq_norms, output_energy, same_bits
from ctp.compress.registry import compress_weight, needs_calibration, needs_norms_only
from ctp.compress.spill import ParkedTensors, SpilledActivations
from ctp.compress.weight import CompressedWeight
from ctp.errors import require
from ctp.io import map_large_allocations, release_memory, trimmed_heap
from ctp.models.adapter import (check_positions, decoder_layers, get_arch, linear_layers, sequential_groups,
                                set_weight_matrix, weight_matrix)

log = logging.getLogger(__name__)

CHUNK_TOKENS = 4096  # calibration tokens per block forward by default (8 windows of 512, 2 of 2048)


def default_chunk(seqlen: int) -> int:
    """Calibration windows per block forward unless told: as many as make :data:`CHUNK_TOKENS` tokens, at least
    one. The forward's intermediates grow with the tokens, not the windows, so long windows take fewer at a time."""
    return max(1, CHUNK_TOKENS // max(seqlen, 1))


class _StopForward(Exception):
    """Raised by the last block's catcher: the inputs are recorded, the rest of the forward is not needed."""


@dataclass
class _BlockCall:
    """How the model calls one decoder block, minus the hidden states.

    ``args``/``kwargs`` were recorded from the first calibration chunk of ``batch`` windows;
    ``hidden_kw`` is True when the hidden states were passed as ``hidden_states=``.
    """

    args: tuple
    kwargs: dict[str, Any]
    batch: int
    hidden_kw: bool = False

    def __call__(self, layer: nn.Module, hidden: Tensor) -> Tensor:
        """Run ``layer`` on ``hidden`` (b, T, d) and return its output hidden states (b, T, d)."""
        b = hidden.shape[0]
        args, kwargs = self.args, self.kwargs
        if b != self.batch:  # a shorter last chunk: cut arguments that carry the batch dimension
            args, kwargs = _slice_batch(args, self.batch, b), _slice_batch(kwargs, self.batch, b)
        out = layer(*args, hidden_states=hidden, **kwargs) if self.hidden_kw else layer(hidden, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out  # blocks return a tensor or a tuple


def _map_tensors(obj: Any, fn) -> Any:
    """Apply ``fn`` to every tensor inside nested tuples/lists/dicts."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _slice_batch(obj: Any, batch: int, b: int) -> Any:
    """Keep the first ``b`` rows of every tensor whose leading dimension is the recorded ``batch``."""
    return _map_tensors(obj, lambda t: t[:b] if t.dim() > 0 and t.shape[0] == batch else t)


def _drop_caches(obj: Any) -> Any:
    """Replace KV-cache objects by None: blocks are replayed many times and must not accumulate state."""
    if isinstance(obj, dict):
        return {k: _drop_caches(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_drop_caches(o) for o in obj)
    return None if type(obj).__name__.endswith("Cache") else obj


# --------------------------------------------------------------------------- report


# --------------------------------------------------------------------------- capture


@contextmanager
def _catchers(layers: nn.ModuleList, calls: list[_BlockCall | None], store: list[Tensor]) -> Iterator[None]:
    """Temporarily replace each block's ``forward`` by a recorder (see the module docstring)."""
    last = len(layers) - 1

    def make(i: int):
        def catcher(*args, **kwargs):
            hidden_kw = not args
            hidden = kwargs.pop("hidden_states") if hidden_kw else args[0]
            rest = args if hidden_kw else args[1:]
            if i == 0:
                store.append(hidden.detach())
            if calls[i] is None:  # the first chunk's arguments serve every chunk
                calls[i] = _BlockCall(_drop_caches(rest), _drop_caches(kwargs), hidden.shape[0], hidden_kw)
            if i == last:
                raise _StopForward
            return hidden

        return catcher

    try:
        for i, layer in enumerate(layers):
            layer.forward = make(i)  # instance attribute shadows the class method
        yield
    finally:
        for layer in layers:
            if "forward" in layer.__dict__:
                del layer.forward


@contextmanager
def _embedding_rows(model: nn.Module, windows: Tensor, source) -> Iterator[Tensor]:
    """The windows as the model should be fed them: unchanged when its input embedding is loaded; when the
    embedding was left on disk (meta), the rows of the windows' tokens alone are read from ``source`` and stand
    in for the matrix for the duration, the windows renumbered into them. The lookup gives the same vectors, so
    the calibration is bit-identical, and memory holds a few thousand rows, not the vocabulary."""
    emb = model.get_input_embeddings()
    weight = emb.weight
    if not weight.is_meta:
        yield windows
        return
    require(source is not None, "the model's input embedding was left on disk, and this recipe runs calibration "
            "data through it", "pass the checkpoint it came from as source= (load_by_blocks returns it)")
    name = source.name_of(model, weight)
    used, renumbered = torch.unique(windows, return_inverse=True)  # sorted token ids, and each one's row among them
    emb._parameters["weight"] = nn.Parameter(source.rows(name, used, weight.dtype), requires_grad=False)
    try:
        yield renumbered.view_as(windows)
    finally:
        emb._parameters["weight"] = weight


@torch.no_grad()
def _capture_inputs(model: nn.Module, windows: Tensor, chunk: int, source=None, store=None) -> tuple[list[Tensor],
                                                                                                    list[_BlockCall]]:
    """Block-0 hidden states per chunk (appended to ``store``: a new list, or a
    :class:`ctp.compress.spill.SpilledActivations` that writes each to disk as it comes), and each block's call
    arguments (an embedding left on disk is read from ``source``, the rows the windows use)."""
    layers = decoder_layers(model)
    calls: list[_BlockCall | None] = [None] * len(layers)
    store = [] if store is None else store
    with _embedding_rows(model, windows, source) as windows, _catchers(layers, calls, store):
        emb_device = model.get_input_embeddings().weight.device
        for start in range(0, windows.shape[0], chunk):
            ids = windows[start : start + chunk].to(emb_device)  # (b, T)
            try:
                model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
    if any(c is None for c in calls) or len(store) != math.ceil(windows.shape[0] / chunk):
        raise RuntimeError("the model's forward did not call every decoder block once per chunk")
    return store, calls  # type: ignore[return-value]


def _calls_to(calls: list[_BlockCall], device: torch.device) -> list[_BlockCall]:
    """Move recorded block arguments to ``device``; a tensor shared by several blocks moves once."""
    moved: dict[int, Tensor] = {}

    def to_dev(t: Tensor) -> Tensor:
        if id(t) not in moved:
            moved[id(t)] = t.to(device)
        return moved[id(t)]

    return [_BlockCall(_map_tensors(c.args, to_dev), _map_tensors(c.kwargs, to_dev), c.batch, c.hidden_kw)
            for c in calls]


# --------------------------------------------------------------------------- driver


def _calibration(tokenizer, cfg: CompressConfig, calib_ids: Tensor | None) -> tuple[Tensor, dict]:
    if calib_ids is not None:
        require(calib_ids.dim() == 2 and calib_ids.shape[0] >= 1,
                f"calibration ids must be (n, seqlen), got shape {tuple(calib_ids.shape)}",
                "pass a 2-D LongTensor of windows")
        return calib_ids.long(), {"source": "given", "nsamples": calib_ids.shape[0], "seqlen": calib_ids.shape[1]}
    from ctp.data.corpora import corpus_ids, leading_ids, sample_windows

    ids, ref = corpus_ids(cfg.calib_dataset, "train", tokenizer)
    windows = sample_windows(ids, cfg.nsamples, cfg.seqlen, cfg.seed, lead=leading_ids(tokenizer))  # (nsamples, seqlen)
    return windows, {**ref.to_dict(), "nsamples": cfg.nsamples, "seqlen": cfg.seqlen, "seed": cfg.seed}


def _check_widths(model: nn.Module, cfg: CompressConfig) -> None:
    """Fail before any work if a layer cannot take the recipe (group size, N:M width)."""
    for layer in decoder_layers(model):
        for mod in linear_layers(layer).values():
            cfg.check_width(weight_matrix(mod).shape[1])


@torch.no_grad()
def _run_block(layer: nn.Module, call: _BlockCall, inps, compute: torch.dtype, out=None):
    """The block's outputs for stored inputs ``inps``, computed in ``compute`` and stored in the inputs' dtype,
    appended to ``out`` (a new list, or activations on disk) chunk by chunk."""
    out = [] if out is None else out
    for h in inps:
        out.append(call(layer, h.to(compute)).to(h.dtype))
    return out


@torch.no_grad()
def _collect_hessians(layer: nn.Module, names: list[str], call: _BlockCall, inps: list[Tensor],
                      cfg: CompressConfig, compute: torch.dtype) -> dict[str, list]:
    """``{name: [H, n_samples]}`` for the linears ``names``, from one pass over ``inps`` (stored block inputs, run
    in ``compute``).

    Two savings, neither changing any number: linears that read the very same input tensor
    (q/k/v, gate/up) share one Hessian, accumulated once; and each chunk's block forward
    stops as soon as every linear of the group has seen its input.
    """
    mods = linear_layers(layer)
    # a recipe that reads only the inputs' norms (Wanda) gets H's diagonal (in,), never the (in, in) matrix
    # the running Hessian belongs to this pass alone: it is updated in place (same values, half the memory)
    norms_only = needs_norms_only(cfg)
    accumulate = accumulate_sq_norms if norms_only else partial(accumulate_hessian, inplace=True)
    args: set[int] = set()
    _map_tensors((call.args, call.kwargs), lambda t: args.add(t.untyped_storage().data_ptr()))
    kept = args  # storages a hook must not scale in place: the chunk's block input, the call's arguments
    slots: list[list] = []  # [H, n_samples] per distinct input
    slot_of: dict[str, int] = {}
    # slot -> the input tensor it took in this chunk, weakly: an input the forward has done with is freed (at the
    # MLP two (tokens, hidden) matrices less), and a dead reference matches no tensor, so ids never mix
    chunk_inputs: dict[int, weakref.ref] = {}

    def hook(name: str):
        def fn(_mod, inp, _out):
            x = inp[0]  # (b, T, in): Linear and Conv1D alike
            if name not in slot_of:  # first chunk: share a slot with a linear fed the same tensor object
                same = [s for s, t in chunk_inputs.items() if t() is x]
                slot_of[name] = same[0] if same else len(slots)
                if not same:
                    slots.append([None, 0])
            s = slot_of[name]
            fresh = s not in chunk_inputs
            if not fresh and chunk_inputs[s]() is not x:
                raise RuntimeError(f"{name} no longer shares its input with the linears it shared it with")
            chunk_inputs[s] = weakref.ref(x)
            complete = all(n in slot_of and slot_of[n] in chunk_inputs for n in names)
            if fresh:
                # the forward stops right after the group's last input: that input, unless it is the block's input
                # or one of its arguments, is scaled in place instead of copied (the same H; one (tokens, in) matrix
                # less)
                own = x.untyped_storage().data_ptr() not in kept
                kw = {"consume": True} if complete and own and not norms_only else {}
                slots[s][0], slots[s][1] = accumulate(slots[s][0], slots[s][1], x.detach(), **kw)
            if complete:
                raise _StopForward  # the rest of the block is not needed for these Hessians

        return fn

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    try:
        for h in inps:
            chunk_inputs.clear()
            block_input = h.to(compute)
            kept = args | {block_input.untyped_storage().data_ptr()}
            try:
                call(layer, block_input)
            except _StopForward:
                pass
            del block_input
    finally:
        chunk_inputs.clear()
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in slot_of]
    if missing:
        raise RuntimeError(f"linear layers {missing} never ran in the block forward")
    hess = {n: slots[slot_of[n]] for n in names}  # shared H tensors: the kernels leave H as it was
    slots.clear()  # hess holds the only references now
    return hess


def _compress_group(
    layer: nn.Module,
    names: list[str],
    call: _BlockCall,
    inps: list[Tensor],
    cfg: CompressConfig,
    compute: torch.dtype,
    done=None,
    take=None,
) -> dict[str, tuple[CompressedWeight, dict]]:
    """Collect the Hessians of ``names`` from one pass over ``inps`` (:func:`_collect_hessians`), then compress
    them (each handed to ``done`` as ``{name: (payload, stats)}`` as soon as it is; ``take(name)`` first puts a
    linear's weight in its module when it waits elsewhere)."""
    mods = linear_layers(layer)
    hess = _collect_hessians(layer, names, call, inps, cfg, compute)
    out: dict[str, tuple[CompressedWeight, dict]] = {}
    for n in names:
        H, count = hess.pop(n)  # a shared H is freed with its last user
        mod = mods[n]
        if take is not None:
            take(n)
        W = weight_matrix(mod)  # (out, in), a view of the module's weight
        base = output_energy(W, H)  # trace(W H W^T), for a relative error (its diagonal part when H is a diagonal)
        t0 = time.perf_counter()
        cw = compress_weight(W, H, count, cfg, lend_h=True)  # H is factored in its own memory, then restored
        set_weight_matrix(mod, cw.weight)
        cw.weight = weight_matrix(mod).detach()  # the module's own tensor: no second copy of the block
        stats = {k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                 for k, v in cw.stats.items()}
        stats.update(seconds=time.perf_counter() - t0, bits=cw.bits, shape=list(cw.weight.shape), n_samples=count)
        if "recon_error" in stats and base > 0:
            stats["rel_error"] = stats["recon_error"] / base
        out[n] = (cw, stats)
        del H
        if done is not None:
            done({n: out[n]})
        release_memory()  # the kernel's freed temporaries back to the system before the next linear's
    return out


@dataclass
class _Stream:
    """Where a block's linears come from and go to when they pass one at a time (see _compress_data_free)."""

    source: Any  # ctp.models.shards.BlockSource
    prefix: str  # the block's name in the model
    device: torch.device
    dtype: torch.dtype
    spill: Any  # ctp.compress.spill.EncodedBlocks


@torch.no_grad()
def _compress_data_free(layer: nn.Module, cfg: CompressConfig, stream: _Stream | None = None):
    """Compress every linear of ``layer`` from its weights alone (no inputs, no Hessian): ``({name: (payload,
    stats)}, None)``.

    With ``stream`` each linear is read from the checkpoint ``stream.source`` just before it is compressed and
    encoded by ``stream.spill`` (:class:`ctp.compress.spill.EncodedBlocks`) at once, its weight released:
    memory holds one linear, not the block. The block's encoded tensors then come back second, for
    ``spill.write``; its other tensors (norms) stay on the meta device, read when the artifact is written."""
    out, encoded = {}, None if stream is None else {}
    for n, mod in linear_layers(layer).items():
        if stream is not None:
            stream.source.load_module(mod, f"{stream.prefix}.{n}", stream.device, stream.dtype)
        W = weight_matrix(mod)
        t0 = time.perf_counter()
        cw = compress_weight(W, None, 0, cfg)
        set_weight_matrix(mod, cw.weight)
        cw.weight = weight_matrix(mod).detach()  # the module's own tensor: no second copy of the block
        stats = {k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                 for k, v in cw.stats.items()}
        stats.update(seconds=time.perf_counter() - t0, bits=cw.bits, shape=list(cw.weight.shape), n_samples=0)
        out[n] = (cw, stats)
        if stream is not None:
            encoded.update(stream.spill.encode({f"{stream.prefix}.{n}": cw}, layer, stream.prefix))
            del W
            release_memory()
    return out, encoded


def compress_model(
    model: nn.Module,
    tokenizer,
    cfg: CompressConfig,
    device: str | torch.device | None = None,
    calib_ids: Tensor | None = None,
    progress: bool = True,
    chunk: int | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    output_error: bool = False,
    source=None,
    spill=None,
    activations_dir: str | Path | None = None,
) -> CompressionReport:
    """Compress every linear layer of every decoder block of ``model`` in place.

    ``device`` is where each block is compressed (default: cuda if available), one block at a time.
    ``calib_ids`` (n, seqlen) replaces the windows drawn from ``cfg.calib_dataset`` (train split);
    ``chunk`` windows go through a block at a time (default :func:`default_chunk`). ``checkpoint_dir`` makes the
    run resumable (a call with the same model, config, data, ``chunk`` and device type continues after the last
    saved block; ``resume=False`` starts over). Magnitude pruning and round-to-nearest run without
    calibration (their weight error is reported; ``output_error=True`` runs it for the output error).
    Larger than memory: with ``source`` (:func:`ctp.models.load.load_by_blocks`) each block is read
    from the checkpoint just before it is compressed, and with ``spill``
    (:class:`ctp.compress.spill.EncodedBlocks`) each finished block is encoded to disk and released;
    the weights are bit-identical to a whole-model run. With ``activations_dir`` the calibration activations
    (each block's inputs and outputs) live in files there, one chunk in memory at a time, the results
    unchanged: for calibrations larger than memory (the directory needs about three times their size).
    Under glibc, allocations of 4 MB and more get their own mappings from here on, for the rest of the process
    (:func:`ctp.io.map_large_allocations`): a fragmented heap otherwise adds up to 0.4 GB to a long run's peak.
    """
    from ctp.devices import default_device

    require(chunk is None or chunk >= 1, f"chunk {chunk} must be at least 1",
            "pass a positive number of windows per forward")
    device = torch.device(device or default_device())
    get_arch(model)  # an architecture ctp does not know is refused before any work
    map_large_allocations()  # freed tensors leave the process at once: no fragmented heap at the peak
    layers = decoder_layers(model)
    _check_widths(model, cfg)
    t_start = time.perf_counter()

    dtype = model.get_input_embeddings().weight.dtype
    data, windows, calib = _calibration_windows(model, tokenizer, cfg, calib_ids, output_error)
    chunk = chunk or default_chunk(windows.shape[1])
    was_training = model.training
    model.eval()
    report = CompressionReport(config=cfg.to_dict(), label=cfg.label(), model_type=model.config.model_type,
                               calibration=calib, bits=None if cfg.quant is None else cfg.quant.bits)
    ckpt, start, t_before = None, 0, 0.0
    if checkpoint_dir is not None:
        ckpt, start, t_before = _resume(model, report, windows, chunk, device, checkpoint_dir, resume, source, spill)
    log.info("compressing %d blocks with %s on %s (%s)", len(layers) - start, cfg.label(), device,
             f"{windows.shape[0]} calibration windows of {windows.shape[1]} tokens" if data else "no calibration data")

    acts = None if activations_dir is None or not data else Path(activations_dir)
    store = getattr(torch, cfg.activations) if cfg.activations != "float32" else dtype  # between blocks

    def new_store(i: int):  # where block i's inputs go: memory, or files under activations_dir
        return [] if acts is None else SpilledActivations(acts / f"block-{i:04d}", device, store)

    with trimmed_heap():  # free heap pages go back every 50 ms, not only after each linear: no creep with depth
        inps, calls = [], []
        if start < len(layers) and data:
            _check_memory(model, windows, device, cfg, chunk, acts)
            inps, calls = _block_inputs(model, windows, chunk, source, device, store, ckpt, start, new_store)

        bar = tqdm(range(start, len(layers)), desc=f"compress {cfg.label()}", unit="block", disable=not progress,
                   initial=start, total=len(layers))
        for i in bar:
            ins = inps
            records, inps = _compress_one_block(model, report, i, calls[i] if data else None, inps, cfg, device, dtype,
                                                source, spill, new_store(i + 1))
            if ins is not inps:
                _discard(ins)  # the block's inputs: its outputs replace them
            if ckpt is not None:
                ckpt.save_block(i, records, report.layers[-1], inps, t_before + time.perf_counter() - t_start,
                                spilled=None if spill is None else spill.block_entries(i, list(records)))
            err, seconds = report.layers[-1]["recon_error"], report.layers[-1]["seconds"]
            bar.set_postfix(err=f"{err:.3g}", s=f"{seconds:.1f}", refresh=False)
            log.debug("block %d: %.1fs, recon error %.4g", i, seconds, err)

        _discard(inps)
    model.train(was_training)
    _finish(report, t_before + time.perf_counter() - t_start)
    log.info("compressed %d linears in %.1fs: sparsity %.4f, mean recon error %.4g",
             len(report.compressed), report.seconds, report.sparsity, report.mean_recon_error)
    return report


def _block_inputs(model: nn.Module, windows: Tensor, chunk: int, source, device: torch.device,
                  store: torch.dtype, ckpt, start: int, new_store) -> tuple[list[Tensor] | SpilledActivations,
                                                                      list[_BlockCall]]:
    """(block ``start``'s inputs, in ``new_store(start)`` as ``store``, on ``device``; every block's call arguments):
    the capture pass gives the arguments (they do not depend on earlier blocks) and block 0's inputs, which a
    resumed run replaces by its checkpoint's."""
    inps, calls = _capture_inputs(model, windows, chunk, source, new_store(0))
    if start:
        _discard(inps)
        inps = ckpt.load_inputs(device, into=new_store(start))
    if isinstance(inps, list):  # on disk they are stored as store already
        for j, h in enumerate(inps):  # one chunk at a time: the model-dtype copies are dropped as they go
            inps[j] = h.to(device, store)
    return inps, _calls_to(calls, device)


def _compress_one_block(model: nn.Module, report: CompressionReport, i: int, call: _BlockCall | None,
                        inps, cfg: CompressConfig, device: torch.device, dtype: torch.dtype, source,
                        spill, out=None) -> tuple[dict[str, CompressedWeight], list[Tensor]]:
    """Compress block ``i`` (from its calibration ``call`` and inputs ``inps``, or from its weights alone when
    ``call`` is None) and add it to ``report``: (its payloads, the next block's inputs, appended to ``out`` when
    given). With ``spill`` the block is encoded on disk when this returns (a checkpoint then only ever names
    blocks whose file is written)."""
    t0 = time.perf_counter()
    layer, prefix = decoder_layers(model)[i], f"{get_arch(model).layers}.{i}"
    encoded = None
    if call is None and source is not None and spill is not None:  # one linear in memory at a time, not a block
        results, encoded = _compress_data_free(layer, cfg, _Stream(source, prefix, device, dtype, spill))
    else:
        stream = _Stream(source, prefix, device, dtype, spill) if source is not None and call is not None else None
        with _on_device(layer, device, source, prefix, dtype, wait=stream is not None):
            if call is not None:
                results, inps = _compress_block(model, layer, call, inps, cfg, dtype, out, stream)
            else:
                results, _ = _compress_data_free(layer, cfg)
    records = _record_block(report, prefix, i, results, time.perf_counter() - t0)
    if spill is not None:
        if encoded is None:
            spill.add(i, records, layer, prefix)
        else:
            spill.write(i, encoded)
    return records, inps


@contextmanager
def _on_device(layer: nn.Module, device: torch.device, source, prefix: str, dtype: torch.dtype,
               wait: bool = False) -> Iterator[None]:
    """The block on the compute device for the duration (read from ``source`` first when it is still on the meta
    device; with ``wait`` its linears' weights are left there, for :class:`_OnDisk`), then back where it lives
    (the CPU for a block read from ``source``), whether or not its work ends normally."""
    home = torch.device("cpu") if source is not None else next(layer.parameters()).device
    if source is not None:
        skip = {f"{n}.weight" for n in linear_layers(layer)} if wait else ()
        source.load_module(layer, prefix, device, dtype, skip=skip)
    _move(layer, device)
    try:
        yield
    finally:  # also when compression fails or is interrupted: the GPU's memory is not left holding the block
        _move(layer, home)


def _move(layer: nn.Module, device: torch.device) -> None:
    """``layer.to(device)``, passing over tensors still on the meta device (weights that wait elsewhere)."""
    layer._apply(lambda t: t if t.is_meta else t.to(device))


def _discard(inps) -> None:
    """Drop stored activations: files on disk are removed, a list is emptied."""
    if isinstance(inps, SpilledActivations):
        inps.discard()
    else:
        inps.clear()


def _check_memory(model: nn.Module, windows: Tensor, device: torch.device, cfg: CompressConfig, chunk: int,
                  acts_dir: Path | None) -> None:
    """Refuse a calibration that cannot fit before any work: its block inputs and outputs (in their storage dtype;
    one chunk of each when they live on disk under ``acts_dir``, which must have room for them), one block's
    weights and its largest Hessians must fit in the memory ``device`` has left."""
    from ctp.devices import available_memory
    from ctp.io import check_free_space

    hidden = model.get_input_embeddings().weight.shape[1]
    all_acts = 2 * windows.numel() * hidden * (2 if cfg.activations != "float32" else 4)  # inputs and outputs
    acts = all_acts
    if acts_dir is not None:  # two stores and the checkpoint's copy of the inputs
        check_free_space(acts_dir, 3 * all_acts // 2, "the calibration activations kept on disk")
        acts = all_acts * min(chunk, windows.shape[0]) // windows.shape[0]
    free = available_memory(device)
    if free is None:
        return
    layer = decoder_layers(model)[0]
    block = sum(p.numel() for p in layer.parameters()) * 4
    widths = [weight_matrix(m).shape[1] for m in linear_layers(layer).values()]
    norms_only = needs_norms_only(cfg)  # Wanda: the diagonals alone
    hessians = sum(w if norms_only else w * w for w in widths) * 4
    need = acts + block + hessians
    require(need < free, f"calibration needs about {need / 2**30:.1f} GiB on {device} ({windows.shape[0]} windows "
            f"of {windows.shape[1]} tokens: {acts / 2**30:.1f} GiB of activations), but {free / 2**30:.1f} GiB are "
            "free", "use fewer --nsamples or a shorter --seqlen, or free memory")


def _calibration_windows(model: nn.Module, tokenizer, cfg: CompressConfig, calib_ids: Tensor | None,
                         output_error: bool) -> tuple[bool, Tensor, dict]:
    """(whether the run needs data, calibration windows (n, seqlen), their record); magnitude / rtn alone run
    straight on the weights, with no windows."""
    if not (output_error or needs_calibration(cfg)):
        return False, torch.zeros(0, 0, dtype=torch.long), {
            "data": None, "why": f"{cfg.label()} reads the weights alone: no calibration data"}
    seqlen = calib_ids.shape[-1] if calib_ids is not None else cfg.seqlen
    check_positions(model, seqlen, f"a calibration window of {seqlen} tokens", "use a shorter --seqlen")
    windows, calib = _calibration(tokenizer, cfg, calib_ids)
    return True, windows, calib


def _resume(model: nn.Module, report: CompressionReport, windows: Tensor, chunk: int, device: torch.device,
            checkpoint_dir: str | Path, resume: bool, source=None, spill=None):
    """(checkpoint, first block to compress, seconds already spent): blocks finished before an interruption are
    restored into ``model`` and ``report``, not recomputed."""
    from ctp.compress.checkpoint import BlockCheckpoint, checkpoint_key

    arch, layers = get_arch(model), decoder_layers(model)
    key = checkpoint_key(model, report.config, windows, chunk, device, source)
    ckpt = BlockCheckpoint(checkpoint_dir, key, len(layers), resume=resume)
    start = ckpt.next_block
    dtype = model.get_input_embeddings().weight.dtype
    for i in range(start):
        prefix = f"{arch.layers}.{i}"
        if source is not None and spill is None:  # the block's other tensors (norms) from the checkpoint
            source.load_module(layers[i], prefix, "cpu", dtype)
        records, entry, adopted = ckpt.restore_block(i, layers[i], prefix, spill)
        report.compressed.update(records)
        report.layers.append(entry)
        if spill is not None and not adopted:  # a checkpoint of an older version: encode the block again
            spill.add(i, records, layers[i], prefix)
    if start:
        log.info("resuming from %s: blocks 0-%d restored", checkpoint_dir, start - 1)
    return ckpt, start, ckpt.seconds


def _compress_block(model: nn.Module, layer: nn.Module, call: _BlockCall, inps, cfg: CompressConfig,
                    compute: torch.dtype, out=None, stream: _Stream | None = None):
    """Compress one block from its calibration inputs (one group of linears at a time with true-sequential
    GPTQ; the block runs in ``compute``); returns its results and the block's compressed outputs, the next
    block's inputs, in the inputs' dtype (appended to ``out`` when given). With ``stream`` (the checkpoint the
    block was read from) its linears wait there until they are compressed (:class:`_OnDisk`)."""
    true_seq = cfg.quant is not None and cfg.quant.true_sequential
    groups = sequential_groups(model, layer) if true_seq else [list(linear_layers(layer))]
    results: dict[str, tuple[CompressedWeight, dict]] = {}
    with _AsCodes(layer, _parking(stream)) as as_codes, _OnDisk(layer, stream) as on_disk:
        for names in groups:
            # (each linear's Hessian and kernel temporaries went back to the system as it finished)
            results.update(_compress_group(layer, names, call, inps, cfg, compute, as_codes.add, on_disk.take))
        outs = _run_block(layer, call, inps, compute, out)
    return results, outs


def _parking(stream: _Stream | None) -> ParkedTensors | None:
    """Where a block's finished linears wait while its others are calibrated and compressed: on disk beside the
    encoded blocks for a block read from a checkpoint onto the CPU (:class:`_AsCodes`), else (None) in memory."""
    from ctp.compress.checkpoint import PARKED_DIR

    if stream is None or stream.spill is None or stream.device.type != "cpu":
        return None
    return ParkedTensors(stream.spill.root.parent / PARKED_DIR)


class _OnDisk:
    """While a block read from a checkpoint is calibrated, its linears not compressed yet wait in the checkpoint,
    not in memory: each forward reads a weight just before its linear runs and drops it after, and :meth:`take`
    reads it back for good before the linear is compressed. A read gives the values the block was loaded with
    (the same bytes, the same conversion), so no number changes; on exit, normal or not, every weight is back in
    its module. With ``stream`` None (a model already in memory) nothing waits. This lowers the peak of the
    forwards and, for a recipe with one pass (SparseGPT), of the whole block: one fp32 linear instead of all."""

    def __init__(self, layer: nn.Module, stream: _Stream | None):
        self.stream, self.mods = stream, linear_layers(layer)
        self.waiting: dict[str, list] = {}  # name -> hooks
        if stream is None:
            return
        for n, mod in self.mods.items():
            _drop_weight(mod)  # (left unread by _on_device: a meta tensor already)
            self.waiting[n] = [mod.register_forward_pre_hook(lambda m, _i, n=n: self._read(n)),
                               mod.register_forward_hook(lambda m, _i, _o: _drop_weight(m))]

    def __enter__(self) -> "_OnDisk":
        return self

    def _read(self, n: str) -> None:
        mod, s = self.mods[n], self.stream
        mod.weight = nn.Parameter(s.source.read(f"{s.prefix}.{n}.weight", s.dtype, s.device),
                                  requires_grad=mod.weight.requires_grad)

    def take(self, n: str) -> None:
        """Linear ``n``'s weight in its module for good (a no-op when it was never waiting)."""
        hooks = self.waiting.pop(n, None)
        if hooks is not None:
            for h in hooks:
                h.remove()
            self._read(n)

    def __exit__(self, *exc) -> None:
        for n in list(self.waiting):
            self.take(n)


class _AsCodes:
    """While a block is at work, its compressed linears wait in a smaller form than their fp32 weights: quantized
    ones as their integer codes (a quarter of the bytes), pruned ones as their kept values beside the mask (half).
    Each forward rebuilds the weight just before the linear runs and drops it after. Only where the rebuilt weight
    equals the compressed one bit for bit (checked), so no number changes; on exit, normal or not, every weight is
    back in its module. This lowers the peak while a block's last linears are calibrated and compressed.

    With ``park`` (:class:`ctp.compress.spill.ParkedTensors`) the waiting forms (codes, masks, kept values) wait on
    disk instead, read back for each forward: memory then holds the linear at work, not the block's finished ones
    (on the CPU, a block's finished linears were the larger part of SparseGPT's peak)."""

    BIG = ("mask", "codes")  # the payload tensors as large as the weight; scales and group indices stay

    def __init__(self, layer: nn.Module, park=None):
        self.mods = linear_layers(layer)
        self.park = park
        # name -> (payload, kept values, hooks, the names of its tensors on disk)
        self.waiting: dict[str, tuple[CompressedWeight, Tensor | None, list, list[str]]] = {}

    def __enter__(self) -> "_AsCodes":
        return self

    def add(self, results: dict[str, tuple[CompressedWeight, dict]]) -> None:
        for n, (cw, _) in results.items():
            mod = self.mods[n]
            if cw.quantized:
                kept = None
            elif cw.mask is not None and cw.weight.dtype == torch.float32:  # pruned: the kept values alone
                kept = cw.weight[cw.mask]
            else:
                continue
            if not same_bits(_rebuilt(cw, kept).to(cw.weight.dtype), cw.weight):
                continue
            _drop_weight(mod)
            cw.weight = mod.weight  # (meta) the codes or kept values are the only copy now
            parked = []
            if self.park is not None:
                for attr in self.BIG:
                    if getattr(cw, attr) is not None:
                        self.park.put(f"{n}.{attr}", getattr(cw, attr))
                        setattr(cw, attr, None)
                        parked.append(attr)
                if kept is not None:
                    self.park.put(f"{n}.kept", kept)
                    kept = None
                    parked.append("kept")
            handles = [mod.register_forward_pre_hook(lambda m, _i, n=n: self._rebuild(n)),
                       mod.register_forward_hook(lambda m, _i, _o: _drop_weight(m))]
            self.waiting[n] = (cw, kept, handles, parked)

    def _rebuild(self, n: str, for_good: bool = False) -> None:
        """Linear ``n``'s weight back in its module, its parked tensors read for the while (``for_good``: kept in
        its payload again)."""
        cw, kept, _, parked = self.waiting[n]
        read = {attr: self.park.get(f"{n}.{attr}") for attr in parked}
        kept = read.pop("kept", kept)
        for attr, t in read.items():
            setattr(cw, attr, t)
        _rebuild_weight(self.mods[n], cw, kept)
        if not for_good:
            for attr in read:
                setattr(cw, attr, None)

    def __exit__(self, *exc) -> None:
        try:
            for n, (cw, _, handles, _) in self.waiting.items():
                for h in handles:
                    h.remove()
                self._rebuild(n, for_good=True)
                cw.weight = weight_matrix(self.mods[n]).detach()
            self.waiting.clear()
        finally:
            if self.park is not None:
                self.park.discard()


def _rebuilt(cw: CompressedWeight, kept: Tensor | None) -> Tensor:
    """``cw``'s fp32 weight from its codes, or from its mask and ``kept`` values (zeros elsewhere)."""
    if kept is None:
        return cw.rebuild()
    return torch.zeros(cw.mask.shape, dtype=kept.dtype, device=kept.device).masked_scatter_(cw.mask, kept)


def _drop_weight(mod: nn.Module) -> None:
    """Release a linear's weight memory: a meta tensor of its shape and dtype takes its place."""
    w = mod.weight
    mod.weight = nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device="meta"), requires_grad=w.requires_grad)


def _rebuild_weight(mod: nn.Module, cw: CompressedWeight, kept: Tensor | None) -> None:
    """Put ``cw``'s weight, rebuilt (:func:`_rebuilt`), back into ``mod`` (whose weight is on the meta device)."""
    set_weight_matrix(mod, _rebuilt(cw, kept))


def _record_block(report: CompressionReport, prefix: str, index: int,
                  results: dict[str, tuple[CompressedWeight, dict]], seconds: float) -> dict[str, CompressedWeight]:
    """Add one finished block to ``report``: each linear's payload (on the CPU, sharing the module's compressed
    weight) and statistics; returns the block's payloads."""
    linears, records = {}, {}
    for n, (cw, stats) in results.items():  # cw.weight is already the module's own compressed weight
        for attr in CompressedWeight.PAYLOAD:
            t = getattr(cw, attr)
            if t is not None:
                setattr(cw, attr, t.cpu())
        records[f"{prefix}.{n}"] = cw
        linears[f"{prefix}.{n}"] = stats
    report.compressed.update(records)
    errs = [s["recon_error"] for s in linears.values() if "recon_error" in s]
    report.layers.append({"index": index, "seconds": seconds, "recon_error": float(sum(errs)), "linears": linears})
    return records


def _finish(report: CompressionReport, seconds: float) -> None:
    """Totals over all compressed linears."""
    report.seconds = seconds
    stats = report.linear_stats()
    n_params = sum(math.prod(s["shape"]) for s in stats.values())
    zeros = sum(s.get("zero_fraction", 0.0) * math.prod(s["shape"]) for s in stats.values())
    pruned = sum(s.get("sparsity", 0.0) * math.prod(s["shape"]) for s in stats.values())
    report.n_params = n_params
    report.sparsity = pruned / n_params if n_params else 0.0
    report.zero_fraction = zeros / n_params if n_params else 0.0
    errs = [s["recon_error"] for s in stats.values() if "recon_error" in s]
    rels = [s["rel_error"] for s in stats.values() if "rel_error" in s]
    report.mean_recon_error = sum(errs) / len(errs) if errs else float("nan")
    report.mean_rel_error = sum(rels) / len(rels) if rels else float("nan")


__all__ = ["CHUNK_TOKENS", "CompressionReport", "compress_model", "default_chunk"]
