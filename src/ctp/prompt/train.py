"""Learning a prompt on a frozen (typically compressed) model: the paper's section 4.2.

The model's parameters never change: only the prompt (soft, (k, hidden), or
prefix, k keys/values per layer; see :mod:`ctp.lm`) is optimised, to minimise
over text windows with the prompt in front one of three objectives:

* ``nll``: the mean next-token NLL (the paper's Eq. 1);
* ``kd``: the mean KL(teacher || student) of the next-token distributions, the
  teacher being the uncompressed model the compressed one came from, run in
  no-grad mode on the same windows without a prompt;
* ``mix``: ``(1 - kd_weight) * nll + kd_weight * kd``.

Compared with the paper's released code:

* the prompt is an fp32 master parameter whatever the model's dtype or the
  autocast mode, so small updates are never rounded away;
* weight decay is applied (an AdamW parameter group with ``weight_decay`` set);
* the best prompt is chosen on the *validation* split, never on the test text
  it is later scored on;
* training is resumable: a checkpoint next to the output (prompt, optimizer
  state, best prompt, RNG state, step, history) is written atomically, and a
  rerun with the same settings continues to the same final prompt an
  uninterrupted run reaches (each step's batch is drawn from a generator
  seeded by (seed, step), so it does not depend on where a run started);
* training is data parallel under a launcher (``accelerate launch``,
  ``torchrun``): ``batch_size`` stays the *global* batch, each process scores
  its share of it and the prompt's gradient is summed across processes, so N
  processes reach the prompt one process reaches (up to float summation
  order). See :func:`train_prompt`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ctp import distributed
from ctp.data.corpora import SOURCES, canonical, corpus_ids, eval_windows, leading_ids, sample_windows
from ctp.errors import CTPError, check_field_types, require
from ctp.io import load_tensors, save_tensors
from ctp.models.adapter import check_positions, decoder_layers
from ctp.models.fingerprint import embedding_fingerprint
from ctp.prompt.artifact import PromptArtifact, artifact_for, save_prompt
from ctp.lm import token_kl, token_nll, window_nll
from ctp.prompt.soft import PromptConfig, init_prompt
from ctp.prompt.teacher import Teacher, as_teacher

log = logging.getLogger(__name__)

CHECKPOINT_KIND = "ctp-prompt-checkpoint"
PRECISIONS = ("auto", "no", "bf16", "fp16")
SCHEDULES = ("cosine", "linear", "constant")
OBJECTIVES = ("nll", "kd", "mix")
VAL_SPLIT = "validation"


@dataclass
class TrainConfig:
    """How to learn a prompt. Defaults follow the paper's appendix A.1 (AdamW, lr 1e-3, wd 1e-5, batch 4, seqlen 1024)."""

    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 4
    seqlen: int = 1024
    steps: int = 1000  # the paper runs up to 30k and keeps the best validation checkpoint
    warmup_steps: int | None = None  # None: 5% of the steps (at most 100)
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.1  # the decay's floor, as a fraction of lr
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    eval_every: int = 100
    eval_windows: int = 16  # validation windows of seqlen tokens used to pick the best prompt
    data: str = "c4"
    train_split: str = "train"
    data_source: str = "local"
    seed: int = 0
    precision: str = "auto"  # auto | no | bf16 | fp16: autocast mode; the prompt itself is always fp32
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100  # 0: never write a resumable checkpoint
    max_minutes: float | None = None  # stop (keeping the best prompt) once training has run this long
    objective: str = "nll"  # nll (the paper) | kd (distil the uncompressed teacher) | mix
    kd_weight: float = 0.5  # with objective mix: (1 - w) * nll + w * kd
    teacher_topk: int = 0  # kd/mix: 0 = the exact KL, teacher run online; K = KL over its top K + rest, cached on disk
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        check_field_types(self)  # a string or a list where a number belongs is an error, not a TypeError
        self.data = canonical(self.data)
        require(self.data_source in SOURCES, f"unknown data source '{self.data_source}'",
                f"use one of {', '.join(SOURCES)}")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        require(all(0 <= b < 1 for b in self.betas), f"betas {self.betas} must lie in [0, 1)", "use e.g. (0.9, 0.999)")
        require(self.eps > 0, f"eps {self.eps} must be positive", "use e.g. 1e-8")
        require(self.lr > 0 and math.isfinite(self.lr), f"learning rate {self.lr} must be positive", "pass e.g. --lr 1e-3")
        require(self.weight_decay >= 0 and math.isfinite(self.weight_decay), f"weight decay {self.weight_decay} must be >= 0", "pass e.g. --weight-decay 1e-5")
        require(self.batch_size >= 1, f"batch size {self.batch_size} must be at least 1", "pass --batch-size 1 or more")
        require(self.seqlen >= 2, f"seqlen {self.seqlen} is too short", "pass --seqlen 2 or more")
        require(self.steps >= 1, f"steps {self.steps} must be at least 1", "pass --steps 1 or more")
        require(self.warmup_steps is None or self.warmup_steps >= 0,
                f"warmup {self.warmup_steps} must be >= 0", "pass --warmup 0 or more")
        require(self.schedule in SCHEDULES, f"unknown schedule '{self.schedule}'", f"use one of {', '.join(SCHEDULES)}")
        require(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio {self.min_lr_ratio} must be in [0, 1]", "pass e.g. 0.1")
        require(self.grad_clip >= 0, f"grad clip {self.grad_clip} must be >= 0", "pass 0 to disable clipping")
        require(self.eval_every >= 1, f"eval_every {self.eval_every} must be at least 1", "pass --eval-every 1 or more")
        require(self.eval_windows >= 1, f"eval_windows {self.eval_windows} must be at least 1",
                "pass --eval-windows 1 or more")
        require(self.train_split in ("train", "validation", "test"), f"unknown split '{self.train_split}'",
                "use train")
        require(self.train_split != VAL_SPLIT, "the prompt cannot be trained on the validation split it is selected on",
                "train on the train split")
        require(self.objective in OBJECTIVES, f"unknown objective '{self.objective}'",
                f"use one of {', '.join(OBJECTIVES)}")
        require(self.teacher_topk >= 0, f"teacher_topk {self.teacher_topk} must be >= 0",
                "pass 0 (exact, online) or e.g. --teacher-topk 64 (cached)")
        require(0 <= self.kd_weight <= 1, f"kd_weight {self.kd_weight} must be in [0, 1]", "pass e.g. --kd-weight 0.5")
        require(self.precision in PRECISIONS, f"unknown precision '{self.precision}'", f"use one of {', '.join(PRECISIONS)}")
        require(self.checkpoint_every >= 0, f"checkpoint_every {self.checkpoint_every} must be >= 0",
                "pass 0 to disable checkpoints")
        require(self.max_minutes is None or self.max_minutes > 0, f"max_minutes {self.max_minutes} must be positive",
                "omit it for no time limit")
        require(isinstance(self.seed, int) and self.seed >= 0, f"seed {self.seed} must be a non-negative integer",
                "pass --seed 0")

    @property
    def warmup(self) -> int:
        """Warmup steps actually used (never more than the steps)."""
        return min(100, self.steps // 20) if self.warmup_steps is None else min(self.warmup_steps, self.steps)

    @classmethod
    def cpu_demo(cls, **overrides) -> TrainConfig:
        """A preset for a ~100M model on a 2-core CPU: short windows, a higher lr, and a 25-minute cap.

        Training stops at ``max_minutes`` (keeping the best validation prompt) if the
        machine is slower than expected, so the whole run stays under 30 minutes.
        """
        base = dict(seqlen=256, batch_size=2, steps=300, lr=1e-2, warmup_steps=10, eval_every=25,
                    eval_windows=8, checkpoint_every=25, max_minutes=25.0)
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k == "betas" else v) for k, v in d.items() if k in names})


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup, then cosine/linear decay to the floor."""
    w = cfg.warmup
    if w and step < w:
        return cfg.lr * (step + 1) / w
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - w) / max(1, cfg.steps - w))
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    return cfg.lr * (1 - (1 - floor) * progress)


def make_optimizer(prompt: nn.Parameter, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the prompt alone, with the weight decay in the parameter group (where AdamW applies it)."""
    return torch.optim.AdamW([{"params": [prompt], "weight_decay": cfg.weight_decay}], lr=cfg.lr,
                             betas=cfg.betas, eps=cfg.eps)


def step_seed(seed: int, step: int) -> int:
    """The seed of the training batch of ``step``: a function of (seed, step) only, so resuming is exact."""
    return (seed * 1_000_003 + step * 7919 + 1) % (2**62)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The autocast mode actually used: 'no', 'bf16' or 'fp16' ('auto' picks bf16 only on GPUs supporting it)."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp16" if device.type == "cuda" else "no"
    if precision == "fp16":
        require(device.type == "cuda", f"fp16 mixed precision is not supported on {device.type}",
                "use --precision bf16 or no on a CPU")
    if precision == "bf16" and device.type == "cuda":
        require(torch.cuda.is_bf16_supported(), "this GPU does not support bf16", "use --precision fp16 or no")
    return precision


def autocast_context(mode: str, device: torch.device):
    """An autocast context for ``mode`` ('no' gives a null context)."""
    if mode == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def checkpointed_layers(model: nn.Module, enabled: bool = True):
    """Recompute each decoder layer's activations in the backward pass (activation checkpointing).

    Transformers' own switch (``gradient_checkpointing_enable``) only acts in
    training mode, which also turns dropout on in families that have it (OPT,
    GPT-2); prompt learning needs the model exactly as it is evaluated. So each
    decoder layer's forward is wrapped with non-reentrant
    ``torch.utils.checkpoint`` while the model stays in eval mode.
    """
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    layers = list(decoder_layers(model))
    for layer in layers:
        inner = layer.forward

        def wrapped(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        layer.forward = wrapped
    try:
        yield
    finally:
        for layer in layers:
            if "forward" in vars(layer):
                del layer.forward


@dataclass
class TrainHistory:
    """What happened during training (JSON-ready)."""

    train_loss: list[float] = field(default_factory=list)  # one per step
    lr: list[float] = field(default_factory=list)  # one per step
    evals: list[dict] = field(default_factory=list)  # {"step", "val_ppl", "val_nll", "seconds" of training so far}
    val_ppl_no_prompt: float | None = None
    best_step: int = 0
    best_val_ppl: float = math.inf
    steps_done: int = 0
    seconds: float = 0.0
    stopped: str | None = None  # why training ended early, if it did
    resumed_from: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainHistory:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def checkpoint_path_for(out_path: str | Path) -> Path:
    """``P.safetensors`` -> ``P.ckpt.safetensors`` next to it."""
    out_path = Path(out_path)
    stem = out_path.name[: -len(".safetensors")] if out_path.name.endswith(".safetensors") else out_path.name
    return out_path.with_name(f"{stem}.ckpt.safetensors")


def _model_identity(model: nn.Module, info, lead: list[int]) -> dict:
    return {"spec": info.spec, "path": info.path, "hidden_size": info.hidden_size,
            "tokenizer_hash": info.tokenizer_hash, "embedding_hash": embedding_fingerprint(model),
            "compression": info.compression, "lead": list(lead)}


def _save_checkpoint(path: Path, prompt: nn.Parameter, best: torch.Tensor, opt: torch.optim.Optimizer,
                     scaler, step: int, history: TrainHistory, identity: dict, prompt_cfg: PromptConfig,
                     train_cfg: TrainConfig) -> None:
    state = opt.state.get(prompt, {})
    tensors = {"prompt": prompt.detach(), "best_prompt": best, "rng_cpu": torch.get_rng_state()}
    scalars = []
    for name, value in state.items():  # AdamW: step (0-dim), exp_avg, exp_avg_sq
        if torch.is_tensor(value):
            if value.dim() == 0:  # stored as shape (1,), restored to a scalar
                scalars.append(name)
                value = value.reshape(1)
            tensors[f"opt.{name}"] = value.detach()
    meta = {"step": step, "opt_scalars": scalars, "history": history.to_dict(), "identity": identity,
            "prompt_config": prompt_cfg.to_dict(), "train_config": train_cfg.to_dict(),
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}
    save_tensors(path, tensors, metadata=meta, kind=CHECKPOINT_KIND)


def comparable_config(cfg: dict) -> dict:
    # max_minutes only bounds one run's wall time and checkpoint_every only when state is saved:
    # neither changes the prompt a finished run reaches.
    return {k: v for k, v in cfg.items() if k not in ("max_minutes", "checkpoint_every")}


def _load_checkpoint(path: Path, identity: dict, prompt_cfg: PromptConfig, train_cfg: TrainConfig):
    fix = f"pass --no-resume to start over, or delete {path}"
    try:
        tensors, meta = load_tensors(path, kind=CHECKPOINT_KIND, what="prompt training checkpoint")
    except CTPError as e:  # truncated, tampered, another version: the fix is to start over
        raise CTPError(e.problem, fix) from e
    saved_id = meta.get("identity", {})
    saved_id = {"lead": [], **saved_id}  # checkpoints from before prompts took the BOS's place: none
    for key in ("hidden_size", "tokenizer_hash", "embedding_hash", "compression", "lead"):
        if saved_id.get(key) != identity.get(key):
            raise CTPError(f"checkpoint {path} belongs to another model ({key} {saved_id.get(key)!r}, "
                           f"this model has {identity.get(key)!r})", fix)
    if meta.get("prompt_config") != prompt_cfg.to_dict():
        raise CTPError(f"checkpoint {path} was made with prompt settings {meta.get('prompt_config')}, "
                       f"not {prompt_cfg.to_dict()}", fix)
    saved_cfg, cfg = comparable_config(meta.get("train_config", {})), comparable_config(train_cfg.to_dict())
    if saved_cfg != cfg:
        diff = ", ".join(f"{k} {saved_cfg.get(k)!r} vs {cfg.get(k)!r}" for k in sorted(set(saved_cfg) | set(cfg))
                         if saved_cfg.get(k) != cfg.get(k))
        raise CTPError(f"checkpoint {path} was made with other training settings ({diff})", fix)
    return tensors, meta


def _shared_checkpoint(ckpt: Path | None, resume: bool, identity: dict, prompt_cfg: PromptConfig,
                       cfg: TrainConfig) -> tuple[dict, dict] | None:
    """The checkpoint to resume from, or None, on every process.

    The main process alone reads it (its disk may be the only one holding it) and sends it on; a
    checkpoint that cannot be used raises the same error on every process, so none waits for the others.
    """
    main, world_size = distributed.is_main(), distributed.world()[1]
    loaded = None
    if main and ckpt is not None and ckpt.exists():
        if resume:
            try:
                loaded = _load_checkpoint(ckpt, identity, prompt_cfg, cfg)
            except CTPError as e:
                if world_size == 1:
                    raise
                loaded = e
        else:
            log.info("ignoring the existing checkpoint %s (no resume); it will be overwritten", ckpt)
    if world_size > 1:
        loaded = distributed.broadcast(loaded)
        if isinstance(loaded, CTPError):
            raise loaded
    return loaded


def _step(model: nn.Module, prompt: nn.Parameter, opt: torch.optim.Optimizer, scaler, teacher: Teacher | None,
          batch: torch.Tensor, cfg: TrainConfig, lr: float, step: int, amp, lead: int = 0) -> tuple[float, str | None]:
    """One optimisation step on ``batch`` (B, T), the global batch: (the batch's mean loss, why to stop or None).

    With several processes each scores its share and the prompt's gradient is summed across them.
    """
    device = prompt.device
    for g in opt.param_groups:
        g["lr"] = lr
    if distributed.world()[1] == 1:
        with amp:
            loss = token_loss(model, batch.to(device), prompt, teacher, cfg, lead).mean()
        loss_value = float(loss.detach())
    else:
        with amp:
            loss = _share_of_mean_loss(model, batch, prompt, device, teacher, cfg, lead)
        loss_value = distributed.sum_across([float(loss.detach())], device)[0]  # the batch's mean
    if not math.isfinite(loss_value):
        return loss_value, f"non-finite loss ({loss_value}) at step {step}"
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if distributed.world()[1] > 1:
        distributed.all_reduce_(prompt.grad)  # the global batch's gradient, the same on every process
    scaler.unscale_(opt)
    grad_norm = float(torch.nn.utils.clip_grad_norm_([prompt], cfg.grad_clip)) if cfg.grad_clip > 0 \
        else float(prompt.grad.norm())
    if not math.isfinite(grad_norm) and not scaler.is_enabled():
        return loss_value, f"non-finite gradient at step {step}"
    scaler.step(opt)  # with fp16, skips the update on overflow and lowers the scale
    scaler.update()
    return loss_value, None


def _restore(loaded: tuple[dict, dict], prompt: nn.Parameter, opt: torch.optim.Optimizer, scaler,
             device: torch.device) -> tuple[torch.Tensor, TrainHistory, int]:
    """Put a checkpoint's prompt, optimizer, scaler and RNG state back; returns (best prompt, history, step)."""
    tensors, meta = loaded
    with torch.no_grad():
        prompt.copy_(tensors["prompt"].to(device))
    best = tensors["best_prompt"].to(device=device, dtype=torch.float32)
    scalars = set(meta.get("opt_scalars", []))
    state = {k[len("opt."):]: v for k, v in tensors.items() if k.startswith("opt.")}
    state = {k: (v.reshape(()) if k in scalars else v) for k, v in state.items()}
    if state:
        sd = opt.state_dict()
        sd["state"] = {0: state}
        opt.load_state_dict(sd)
    if meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng_cpu"])
    history = TrainHistory.from_dict(meta["history"])
    start = int(meta["step"])
    history.resumed_from.append(start)
    return best, history, start


def _evaluate(model, windows, prompt, batch_size, amp, lead: int = 0) -> tuple[float, float]:
    with amp:
        total, count = window_nll(model, windows, prompt, batch_size=batch_size, lead=lead)
    nll = total / count
    return nll, (math.exp(nll) if nll < 700 else math.inf)


@dataclass
class _Run:
    """What one training run carries from step to step (the loop in :func:`train_prompt` drives it)."""

    model: nn.Module
    prompt: nn.Parameter
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    cfg: TrainConfig
    prompt_cfg: PromptConfig
    amp: contextlib.AbstractContextManager
    val_windows: torch.Tensor
    identity: dict
    ckpt: Path | None
    main: bool
    lead: int = 0  # leading (BOS) tokens of every window, whose place the prompt takes (see ctp.lm)
    history: TrainHistory = field(default_factory=TrainHistory)
    best: torch.Tensor | None = None
    start: int = 0
    seconds_before: float = 0.0  # time spent by earlier (interrupted) runs
    t_loop: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return self.seconds_before + (time.perf_counter() - self.t_loop)

    def validate(self, at_step: int) -> float:
        """Validation PPL of the current prompt; keeps it as the best if it is."""
        h = self.history
        nll, ppl = _evaluate(self.model, self.val_windows, self.prompt.detach(), self.cfg.batch_size, self.amp,
                             self.lead)
        h.evals.append({"step": at_step, "val_ppl": ppl, "val_nll": nll, "seconds": self.seconds()})
        if ppl < h.best_val_ppl or not h.evals[:-1]:
            h.best_val_ppl, h.best_step = ppl, at_step
            self.best = self.prompt.detach().clone()
        return ppl

    def checkpoint(self, done: int) -> None:
        cfg = self.cfg
        if self.main and self.ckpt is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 \
                and done < cfg.steps:
            _save_checkpoint(self.ckpt, self.prompt, self.best, self.opt, self.scaler, done, self.history,
                             self.identity, self.prompt_cfg, cfg)

    def out_of_time(self, done: int, device: torch.device) -> bool:
        """Whether the time limit stops the run after step ``done`` (decided alike on every process)."""
        cfg = self.cfg
        if cfg.max_minutes is None or done >= cfg.steps or \
                not distributed.any_across(self.history.seconds > cfg.max_minutes * 60, device):
            return False
        self.stop(done, f"time limit of {cfg.max_minutes} minutes reached at step {done}")
        return True

    def stop(self, done: int, why: str) -> None:
        """End the run after step ``done``, validating the prompt there so it can still be the best."""
        self.history.stopped = why
        if self.history.evals[-1]["step"] != done:
            self.validate(done)


def train_prompt(
    model: nn.Module,
    tokenizer,
    model_info,
    prompt_cfg: PromptConfig | None = None,
    train_cfg: TrainConfig | None = None,
    out_path: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    checkpoint_path: str | Path | None = None,
    callback: Callable[[int, TrainHistory, nn.Parameter], None] | None = None,
    teacher: nn.Module | Teacher | None = None,
) -> tuple[PromptArtifact, TrainHistory]:
    """Learn a soft prompt on the frozen ``model``; return the best-on-validation prompt and the history.

    Every ``eval_every`` steps (and after the last) the validation perplexity of
    the current prompt is measured on the first ``eval_windows`` windows of the
    validation split, and the best prompt so far is kept. A non-finite loss or
    gradient stops training with a warning and returns the best prompt found
    before it. With ``out_path`` the artifact is saved there, and a resumable
    checkpoint is written every ``checkpoint_every`` steps to ``checkpoint_path``
    (default ``<out>.ckpt.safetensors``); it is removed once the artifact is saved.
    ``callback(step, history, prompt)`` runs after each step (after any eval and checkpoint) with the live
    fp32 prompt parameter (read it, do not modify it); a true return stops the run there, as the time
    limit does (the prompt is validated at that step). Under ``torch.distributed`` its answer must be the
    same on every process. The objectives ``kd`` and ``mix`` need ``teacher``,
    the uncompressed model (frozen, no-grad, on any device; it sees the windows without a prompt).

    In a ``torch.distributed`` process group of N > 1 every process calls this with the same model and
    settings; ``batch_size`` is the global batch, split into N contiguous shares whose prompt gradients are
    summed, so every process holds the prompt one process reaches (up to float summation order). Stopping
    decisions are the same everywhere; only the main process reads and writes the checkpoint and the
    artifact and shows progress; every process returns the artifact and the history.
    """
    prompt_cfg = prompt_cfg or PromptConfig()
    cfg = train_cfg or TrainConfig()
    t_start = time.perf_counter()
    device = model.get_input_embeddings().weight.device
    require(cfg.objective == "nll" or teacher is not None, f"the objective '{cfg.objective}' needs a teacher model",
            "pass --teacher MODEL (the uncompressed model), or use --objective nll")
    teacher = as_teacher(teacher, cfg.teacher_topk) if cfg.objective != "nll" else None
    check_positions(model, prompt_cfg.num_tokens + cfg.seqlen,
                    f"prompt ({prompt_cfg.num_tokens}) + seqlen ({cfg.seqlen})", "use a shorter --seqlen or fewer --tokens")
    lead = leading_ids(tokenizer)  # every window starts with the tokenizer's BOS, if it adds one
    train_ids, train_ref, val_ref, val_windows = _training_data(tokenizer, cfg, lead)
    run = _start_run(model, tokenizer, model_info, prompt_cfg, cfg, val_windows, device, lead,
                     Path(checkpoint_path) if checkpoint_path else (checkpoint_path_for(out_path) if out_path else None),
                     resume)
    history = run.history
    bar = tqdm(total=cfg.steps, initial=run.start, desc="train prompt", disable=not progress or not run.main,
               unit="step", leave=False)
    with _frozen(model, teacher), checkpointed_layers(model, cfg.gradient_checkpointing):
        try:
            for step in range(run.start, cfg.steps):
                lr = lr_at(step, cfg)
                batch = sample_windows(train_ids, cfg.batch_size, cfg.seqlen, seed=step_seed(cfg.seed, step),
                                       lead=lead)
                loss, history.stopped = _step(model, run.prompt, run.opt, run.scaler, teacher, batch, cfg, lr, step,
                                              run.amp, run.lead)
                if history.stopped:
                    break
                history.train_loss.append(loss)
                history.lr.append(lr)
                history.steps_done = done = step + 1
                bar.update(1)
                if (done % cfg.eval_every == 0 or done == cfg.steps) and not math.isfinite(run.validate(done)):
                    history.stopped = f"non-finite validation perplexity at step {done}"
                history.seconds = run.seconds()
                bar.set_postfix(loss=f"{loss:.3f}", val_ppl=f"{history.evals[-1]['val_ppl']:.2f}",
                                best=f"{history.best_val_ppl:.2f}", refresh=False)
                run.checkpoint(done)
                if callback is not None and callback(done, history, run.prompt) and not history.stopped:
                    run.stop(done, f"stopped by the caller at step {done}")
                    break
                if history.stopped or run.out_of_time(done, device):
                    break
        finally:
            bar.close()
    return _finish_run(run, model, model_info, train_ref, val_ref, out_path, t_start), history


def _training_data(tokenizer, cfg: TrainConfig, lead: list[int]):
    """(training token ids, their record, the validation record, validation windows (n_val, seqlen))."""
    train_ids, train_ref = corpus_ids(cfg.data, cfg.train_split, tokenizer, cfg.data_source)
    val_ids, val_ref = corpus_ids(cfg.data, VAL_SPLIT, tokenizer, cfg.data_source)
    val_windows = eval_windows(val_ids, cfg.seqlen, cfg.eval_windows, lead=lead)  # (n_val, seqlen)
    require(train_ids.numel() > cfg.seqlen, f"the training text has {train_ids.numel()} tokens, "
            f"not more than one window of {cfg.seqlen}", "use a shorter --seqlen")
    return train_ids, train_ref, val_ref, val_windows


@contextlib.contextmanager
def _frozen(model: nn.Module, teacher: Teacher | None):
    """The base model frozen and in eval mode (no dropout) while only the prompt learns; restored after."""
    was_training = model.training
    grad_flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    if teacher is not None:
        teacher.eval()
    try:
        yield
    finally:
        model.train(was_training)
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)


def _start_run(model: nn.Module, tokenizer, model_info, prompt_cfg: PromptConfig, cfg: TrainConfig,
               val_windows: torch.Tensor, device: torch.device, lead: list[int], ckpt: Path | None,
               resume: bool) -> _Run:
    """A fresh run (initial prompt, optimizer, baseline validation) or one restored from its checkpoint."""
    mode = resolve_precision(cfg.precision, device)
    world_size = distributed.world()[1]
    prompt = nn.Parameter(init_prompt(model, tokenizer, prompt_cfg, lead).to(device=device, dtype=torch.float32))
    opt = make_optimizer(prompt, cfg)
    identity = _model_identity(model, model_info, lead)
    if world_size > 1:  # the initial prompt is a function of the embedding, the tokenizer and the seed
        hashes = distributed.gather(identity["embedding_hash"])
        require(len(set(hashes)) == 1, f"the {world_size} processes hold different models "
                f"(embedding fingerprints {hashes})", "load the same model in every process")
    run = _Run(model, prompt, opt, torch.amp.GradScaler(device.type, enabled=(mode == "fp16")), cfg, prompt_cfg,
               autocast_context(mode, device), val_windows, identity, ckpt, distributed.world()[0] == 0,
               lead=len(lead), best=prompt.detach().clone())
    loaded = _shared_checkpoint(ckpt, resume, identity, prompt_cfg, cfg)
    if loaded is not None:
        run.best, run.history, run.start = _restore(loaded, prompt, opt, run.scaler, device)
        log.info("resuming prompt training from %s at step %d/%d", ckpt, run.start, cfg.steps)
    run.seconds_before, run.t_loop = run.history.seconds, time.perf_counter()
    if run.start == 0 and not run.history.evals:
        with _frozen(model, None):
            run.history.val_ppl_no_prompt = _evaluate(model, val_windows, None, cfg.batch_size, run.amp, run.lead)[1]
            ppl = run.validate(0)
        log.info("validation PPL: no prompt %.3f, initial prompt %.3f", run.history.val_ppl_no_prompt, ppl)
    return run


def _finish_run(run: _Run, model: nn.Module, model_info, train_ref, val_ref, out_path: str | Path | None,
                t_start: float) -> PromptArtifact:
    """The artifact of the best prompt, saved (main process) with the checkpoint removed."""
    history, cfg = run.history, run.cfg
    history.seconds = run.seconds()
    if history.stopped:
        log.warning("prompt training stopped early: %s; keeping the best prompt (step %d, validation PPL %.3f)",
                    history.stopped, history.best_step, history.best_val_ppl)
    art = artifact_for(
        model, model_info, run.best,
        data=train_ref.to_dict(), validation={**val_ref.to_dict(), "seqlen": cfg.seqlen,
                                              "windows": int(run.val_windows.shape[0])},
        steps=history.steps_done, best_step=history.best_step, best_val_ppl=history.best_val_ppl,
        val_ppl_no_prompt=history.val_ppl_no_prompt, train_config=cfg.to_dict(),
        prompt_config=run.prompt_cfg.to_dict(), lead=run.identity["lead"],
    )
    if out_path is not None and run.main:
        save_prompt(out_path, art)
        if run.ckpt is not None and run.ckpt.exists():
            run.ckpt.unlink()
    distributed.barrier()  # every process returns once the artifact is written
    log.info("prompt training: %d steps in %.0fs (this run %.0fs), best validation PPL %.3f at step %d",
             history.steps_done, history.seconds, time.perf_counter() - t_start, history.best_val_ppl,
             history.best_step)
    return art


def token_loss(model: nn.Module, ids: torch.Tensor, prompt: torch.Tensor, teacher: nn.Module | Teacher | None,
               cfg: TrainConfig, lead: int = 0) -> torch.Tensor:
    """The training objective per scored token of ``ids`` (b, T), shape (b, T-1-lead); ``teacher`` the model
    itself or a :class:`~ctp.prompt.teacher.Teacher`; ``lead`` the windows' leading (BOS) tokens (see ctp.lm)."""
    if cfg.objective == "nll":
        return token_nll(model, ids, prompt, lead=lead)
    logp, idx = as_teacher(teacher, cfg.teacher_topk).targets(ids)
    kl, nll = token_kl(model, ids, logp, prompt, idx, lead)
    return kl if cfg.objective == "kd" else (1 - cfg.kd_weight) * nll + cfg.kd_weight * kl


def _share_of_mean_loss(model: nn.Module, batch: torch.Tensor, prompt: nn.Parameter, device: torch.device,
                        teacher: Teacher | None, cfg: TrainConfig, lead: int = 0) -> torch.Tensor:
    """This process's term of the batch's mean token loss: its share's loss sum over the whole batch's token count.

    Summed over processes the terms (and their gradients) are the mean over
    ``batch`` (B, T). A process with an empty share (more processes than
    windows) contributes a zero that still has a gradient to all-reduce.
    """
    local = distributed.shard(batch).to(device)  # (b, T), b = B / processes (+1 for the first B % processes)
    if local.shape[0] == 0:
        return prompt.sum() * 0.0
    return token_loss(model, local, prompt, teacher, cfg, lead).sum() / (batch.shape[0] * (batch.shape[1] - 1 - lead))


__all__ = ["TrainConfig", "TrainHistory", "train_prompt", "make_optimizer", "lr_at", "checkpoint_path_for", "checkpointed_layers",
           "resolve_precision", "autocast_context", "step_seed", "token_loss", "OBJECTIVES"]
