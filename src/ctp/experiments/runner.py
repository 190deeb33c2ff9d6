"""Run an experiment grid with content-hash caching, so reruns skip finished work.

Layout of a run directory (``runs/<name>`` by default)::

    models/<label>-<hash>/          compressed model artifacts (ctp compress format)
    models/<label>-<hash>.partial/  per-block checkpoint while that model is being compressed
    prompts/<label>-<data>-k<k>-<hash>.safetensors   learned prompts (+ .ckpt while training)
    cells/<kind>-<hash>.json        one finished measurement each
    measurements/ppl-<hash>.json    per-window NLLs of one (model, prompt, dataset), shared by the cells that
                                    read its first windows
    experiment.json                 the resolved experiment config
    results.json                    every measurement, flat
    report.md, *.png                the report (see ctp.experiments.report)

Every artifact and cell is keyed by a hash of everything that determines it
(model, compression config, prompt settings, evaluation settings, and the keys
of what it depends on). An interrupted run resumes: finished cells and
artifacts are reused, and a compression or a prompt training that was cut off
resumes from its checkpoint.

With ``workers`` > 1 (``ctp run --workers N``), N processes work through the
same grid at once: each claims a model, prompt or cell with a lock file
(``<path>.lock``, holding its pid) before making it, skips what another holds
and comes back to it, so the machine's cores share the work. The latency cells
are left to the parent, which measures them alone once the workers are done
and writes the results and the report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ctp.errors import CTPError, require
from ctp.experiments.config import FULL, ExperimentConfig
from ctp.io import atomic_write_json, check_output, read_json
from ctp.logs import quiet_third_party
from ctp.models.names import COMPRESSED_MARKER, is_compressed_artifact

log = logging.getLogger(__name__)


# Bumped whenever a change alters what a measurement records or its numbers; it is part of every cell's key,
# so a rerun measures again what an older version measured. 2: per-window NLLs and confidence intervals.
EVAL_VERSION = 2


def content_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class PromptRef:
    """A prompt used in a measurement: none, the hard prompt, or a learned one."""

    name: str  # 'none', 'hard', or a learned prompt's id
    key: str  # content key ('' for none)
    path: str | None = None
    source_model: str | None = None
    data: str | None = None
    tokens: int = 0
    recipe: str | None = None  # a prompt.compare entry; None: the main recipe


NONE = PromptRef("none", "")

# roles of the ablation cells (scored on perplexity.ablation_windows): transfers and the prompt-length sweep
ABLATION_ROLES = ("transfer", "transfer:own", "transfer:none", "direct", "transferred")


def is_ablation(role: str) -> bool:
    return role in ABLATION_ROLES or role.startswith("length")


class Busy(Exception):
    """Another worker process holds the lock of what this one was about to make."""


def _holder_alive(lock: Path) -> bool:
    """Whether the process named in ``lock`` ("pid host") may still be running."""
    try:
        text = lock.read_text().split()
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return True  # removed meanwhile: try again
    if len(text) < 2 or not text[0].isdigit() or int(text[0]) == 0:
        return age < 60  # being written; an unreadable lock older than a minute was left by a killed process
    pid, host = int(text[0]), text[1]
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)  # pid > 0 here: never a signal to a process group
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


@dataclass
class Runner:
    cfg: ExperimentConfig
    root: Path
    progress: bool = True
    records: list[dict] = field(default_factory=list)
    on_save: Callable[[list[dict]], None] | None = None  # called after each stage (e.g. to rewrite the report)
    worker: bool = False  # one of several processes sharing the grid (see the module docstring)
    _loaded: tuple[str, object, object, object] | None = None
    _lead: list[int] | None = None
    _teacher: object | None = None
    deferred: int = 0  # what this pass skipped because another worker holds it

    @contextlib.contextmanager
    def claim(self, path: str | Path):
        """Hold the lock of ``path`` while making it (only between workers); :class:`Busy` if another holds it."""
        if not self.worker:
            yield
            return
        lock = Path(str(path) + ".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                if _holder_alive(lock):
                    raise Busy(str(path)) from None
                log.warning("removing the stale lock %s (its process has ended)", lock)
                lock.unlink(missing_ok=True)
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)

    def attempt(self, make: Callable, *args) -> object | None:
        """``make(*args)``, or None (counted in ``deferred``) when another worker holds what it needs."""
        try:
            return make(*args)
        except Busy:
            self.deferred += 1
            return None

    # ------------------------------------------------------------------ keys and paths

    def _device(self) -> str:
        from ctp.devices import default_device

        return self.cfg.device or default_device()

    def compress_config(self, label: str):
        return self.cfg.compress_config(label)

    def model_key(self, label: str) -> str:
        base = {"model": self.cfg.model}
        lead = self.leading_ids()
        if lead:  # windows start with the tokenizer's BOS; models whose tokenizer adds none keep their old keys
            base["lead"] = lead
        if label == FULL:
            return content_hash(base)
        from ctp.compress.config import ALGORITHM_VERSION

        return content_hash({**base, "compress": self.compress_config(label).to_dict(),
                             "algorithm_version": ALGORITHM_VERSION})

    def leading_ids(self) -> list[int]:
        """The token the model's tokenizer puts before every window (:func:`ctp.data.corpora.leading_ids`)."""
        if self._lead is None:
            from ctp.data.corpora import leading_ids
            from ctp.models.load import load_tokenizer

            self._lead = leading_ids(load_tokenizer(self.cfg.model))
        return self._lead

    def model_path(self, label: str) -> str:
        """Where the compressed model of ``label`` lives.

        An identical artifact (same content key) already made by a sibling run under
        the same parent directory is reused instead of compressing again.
        """
        if label == FULL:
            return self.cfg.model
        key = self.model_key(label)
        own = self.root / "models" / f"{label}-{key}"
        if not is_compressed_artifact(own):
            for other in sorted(self.root.parent.glob(f"*/models/*-{key}")):
                if is_compressed_artifact(other):
                    return str(other)
        return str(own)

    # ------------------------------------------------------------------ stage 1: compressed models

    def ensure_model(self, label: str) -> str:
        path = self.model_path(label)
        if label == FULL or is_compressed_artifact(path):
            return path
        with self.claim(path):
            if not is_compressed_artifact(path):  # another worker may have finished it meanwhile
                self._compress(label, path)
        return path

    def _compress(self, label: str, path: str) -> None:
        from ctp.compress import compress_model, save_compressed
        from ctp.compress.checkpoint import ENCODED_DIR, checkpoint_dir_for, discard_checkpoint
        from ctp.compress.spill import EncodedBlocks
        from ctp.models.load import load_by_blocks

        cfg = self.compress_config(label)
        log.info("compressing %s (%s)", label, cfg.label())
        # one block in memory at a time where it can; the embedding stays on disk (calibration reads its rows)
        model, tok, info, source = load_by_blocks(self.cfg.model, embeddings=False)
        partial = checkpoint_dir_for(path)  # an interrupted compression resumes from its last finished block
        spill = None if source is None else EncodedBlocks(partial / ENCODED_DIR, model.get_input_embeddings().weight.dtype,
                                                          source)
        report = compress_model(model, tok, cfg, device=self._device(), progress=self.progress,
                                checkpoint_dir=partial, source=source, spill=spill)
        save_compressed(model, tok, report, out_dir=path, source=info.to_dict(), encoded=spill)
        discard_checkpoint(partial)
        self._loaded = None

    def load(self, label: str):
        """The model of ``label`` (kept loaded while consecutive work uses it)."""
        if self._loaded is None or self._loaded[0] != label:
            from ctp.models.load import load_model

            self._loaded = None
            model, tok, info = load_model(self.ensure_model(label), device=self._device(), runtime=self.cfg.runtime)
            self._loaded = (label, model, tok, info)
        return self._loaded[1], self._loaded[2], self._loaded[3]

    # ------------------------------------------------------------------ stage 2: learned prompts

    def prompt_ref(self, label: str, data: str | None = None, tokens: int | None = None,
                   recipe: str | None = None) -> PromptRef:
        """The learned prompt of model ``label``: the main recipe, or the ``prompt.compare`` entry ``recipe``."""
        p = self.cfg.prompt
        if p is None:
            raise CTPError("the experiment has no 'prompt' section", "add one to learn prompts")
        r = p.recipe(recipe)
        data = data or p.data
        tokens = r["tokens"] if tokens is None else tokens
        spec = {"model": self.model_key(label), "data": data, "tokens": tokens, "init": r["init"],
                "train": r["train"], "seed": self.cfg.seed}
        if r["kind"] != "soft":  # soft prompts keep the keys they had before prompt kinds existed
            spec["kind"] = r["kind"]
        if self.cfg.runtime != "dense":  # likewise dense runs keep theirs
            spec["runtime"] = self.cfg.runtime
        if self.leading_ids():  # the prompt takes the BOS's place (ctp.lm); models without one keep their keys
            spec["placement"] = "lead"
        key = content_hash(spec)
        name = f"{label}@{data}" + ("" if tokens == p.tokens else f"/k{tokens}") + (f"#{recipe}" if recipe else "")
        path = self.root / "prompts" / f"{label}-{data}-k{tokens}-{key}.safetensors"
        return PromptRef(name, key, str(path), label, data, tokens, recipe)

    def ensure_prompt(self, ref: PromptRef) -> PromptRef:
        if ref.path is None or Path(ref.path).is_file():
            return ref
        self.ensure_model(ref.source_model)
        with self.claim(ref.path):
            if not Path(ref.path).is_file():
                self._train(ref)
        return ref

    def _train(self, ref: PromptRef) -> None:
        from ctp.prompt.train import train_prompt

        model, tok, info = self.load(ref.source_model)
        pcfg, tcfg = self.cfg.prompt.configs(self.cfg.seed, tokens=ref.tokens, data=ref.data, recipe=ref.recipe)
        teacher = self.teacher() if tcfg.objective != "nll" else None
        log.info("learning prompt %s (%d %s tokens on %s, objective %s)", ref.name, ref.tokens, pcfg.kind, ref.data,
                 tcfg.objective)
        train_prompt(model, tok, info, pcfg, tcfg, out_path=ref.path, resume=True, progress=self.progress,
                     teacher=teacher)

    def teacher(self):
        """The uncompressed model, the teacher of distillation objectives (loaded once, beside the current model)."""
        if self._teacher is None:
            from ctp.models.load import load_model

            self._teacher = load_model(self.cfg.model, device=self._device())[0]
        return self._teacher

    def prompt_tensor(self, ref: PromptRef, model, tok, info) -> torch.Tensor | None:
        if ref.name == "none":
            return None
        if ref.name == "hard":
            from ctp.prompt.embed import hard_prompt

            return hard_prompt(model, tok)
        from ctp.prompt.artifact import load_prompt

        return load_prompt(self.ensure_prompt(ref).path, info, lead=self.leading_ids()).embeddings

    def hard_ref(self) -> PromptRef:
        # with a BOS the hard prompt starts with it, taking its place (ctp.lm); models without one keep the key
        return PromptRef("hard", "hard-lead" if self.leading_ids() else "hard")

    # ------------------------------------------------------------------ cells

    def cell(self, kind: str, spec: dict, compute: Callable[[], dict]) -> dict | None:
        """A cached measurement: ``compute()`` runs only when no finished cell has this key (None: another worker
        is making it or what it needs)."""
        spec = {**spec, "eval_version": EVAL_VERSION}
        if self.cfg.runtime != "dense":
            spec["runtime"] = self.cfg.runtime
        path = self.root / "cells" / f"{kind}-{content_hash({'kind': kind, **spec})}.json"
        record = None
        if path.is_file():
            try:
                record = read_json(path, "cached result")
                if not isinstance(record, dict) or record.get("kind") != kind:
                    raise CTPError(f"cached result {path} is not a {kind} measurement", "it is recomputed")
            except CTPError as e:  # a cache entry: measure again rather than stop the grid
                log.warning("%s; measuring again", e.problem)
                record = None
        if record is None:
            try:
                with self.claim(path):
                    t0 = time.perf_counter()
                    record = {"kind": kind, **spec, **compute()}
                    record["seconds"] = time.perf_counter() - t0
                    atomic_write_json(path, record)
            except Busy:
                self.deferred += 1
                return None
        self.records.append(record)
        return record

    def ppl(self, label: str, ref: PromptRef, dataset: str, role: str) -> dict | None:
        s = self.cfg.perplexity
        windows = s.ablation_windows if is_ablation(role) and s.ablation_windows is not None else s.max_windows
        spec = {"model": label, "model_key": self.model_key(label), "prompt": ref.name, "prompt_key": ref.key,
                "prompt_tokens": ref.tokens, "prompt_source": ref.source_model, "prompt_data": ref.data,
                "dataset": dataset, "split": s.split, "seqlen": s.seqlen, "max_windows": windows,
                "role": role}
        return self.cell("ppl", spec, lambda: self._window_nlls(label, ref, dataset, windows))

    def _window_nlls(self, label: str, ref: PromptRef, dataset: str, windows: int | None) -> dict:
        """The perplexity fields of the first ``windows`` windows (None: all) of ``dataset`` for model ``label``
        with ``ref``: read from the one measurement of that triple, which is made (again) only when it has fewer
        windows than asked for. Cells of other roles and window counts share it."""
        from ctp.eval.perplexity import perplexity, window_summary

        s = self.cfg.perplexity
        key = {"model_key": self.model_key(label), "prompt_key": ref.key, "dataset": dataset, "split": s.split,
               "seqlen": s.seqlen, "eval_version": EVAL_VERSION, "runtime": self.cfg.runtime}
        if self.leading_ids():  # the first text token after the BOS is not scored (ctp.lm); others keep their keys
            key["scored"] = "after-lead"
        path = self.root / "measurements" / f"ppl-{content_hash(key)}.json"

        def covers(m: dict | None) -> bool:  # None windows: the whole split; fewer windows than asked: all there are
            return m is not None and (m["max_windows"] is None or m["n_windows"] < m["max_windows"]
                                      or (windows is not None and windows <= m["max_windows"]))

        m = self._read_measurement(path, key)
        if not covers(m):
            self.ensure_model(label)  # what it needs first, so a busy dependency costs no model load
            if ref.path:
                self.ensure_prompt(ref)
            with self.claim(path):
                m = self._read_measurement(path, key)
                if not covers(m):
                    model, tok, info = self.load(label)
                    prompt = self.prompt_tensor(ref, model, tok, info)
                    r = perplexity(model, tok, dataset, s.split, s.seqlen, prompt=prompt, batch_size=s.batch_size,
                                   max_windows=windows, progress=self.progress)
                    log.info("perplexity of %s with prompt %s on %s: %.3f (%d windows, %.0f s)", label, ref.name,
                             dataset, r.ppl, r.n_windows, r.seconds)
                    m = {"key": key, "max_windows": windows, "n_windows": r.n_windows, "seconds": r.seconds,
                         "window_nll": r.window_nll}
                    atomic_write_json(path, m)
        nlls = m["window_nll"] if windows is None else m["window_nll"][:windows]
        return window_summary(nlls, s.seqlen, len(self.leading_ids()))

    @staticmethod
    def _read_measurement(path: Path, key: dict) -> dict | None:
        if not path.is_file():
            return None
        try:
            m = read_json(path, "cached measurement")
            require(isinstance(m, dict) and m.get("key") == key and isinstance(m.get("window_nll"), list)
                    and m.get("n_windows") == len(m["window_nll"]) > 0,
                    f"cached measurement {path} does not match its name", "it is measured again")
            return m
        except CTPError as e:
            log.warning("%s; measuring again", e.problem)
            return None

    # ------------------------------------------------------------------ the grid

    def run(self) -> list[dict]:
        cfg = self.cfg
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.worker:
            atomic_write_json(self.root / "experiment.json", cfg.to_dict())
        self.records, self.deferred = [], 0
        for label in cfg.labels():
            if self.attempt(self.ensure_model, label) is not None:
                self.records.append({"kind": "model", "model": label, "model_key": self.model_key(label),
                                     **self._model_summary(label)})
        for label in cfg.prompted():
            self.attempt(self.ensure_prompt, self.prompt_ref(label))
            for name in cfg.prompt.compare or {}:
                self.attempt(self.ensure_prompt, self.prompt_ref(label, recipe=name))
        # cheapest stages first; after each, results.json (and the report, if asked) reflect what is done
        stages = [
            (cfg.perplexity, self._perplexity),
            (cfg.latency and not self.worker, self._latency),  # timed alone, by the parent of any workers
            (cfg.length_ablation and cfg.prompt, self._length_ablation),
            (cfg.zeroshot, self._zeroshot),
            (cfg.transfer and cfg.transfer.datasets and cfg.prompt, self._dataset_transfer),
            (cfg.case_study, self._case_study),
        ]
        for enabled, stage in stages:
            if enabled:
                self.attempt(stage)
                if not self.worker:
                    self.save(complete=False)
        if not self.worker:
            self.save(complete=True)
        return self.records

    def work(self, poll_s: float = 2.0) -> None:
        """As one of several worker processes: pass over the grid until nothing is left that others hold."""
        while True:
            self.run()
            if not self.deferred:
                return
            log.info("%d item(s) wait for other workers", self.deferred)
            time.sleep(poll_s)

    def finished_records(self) -> list[dict]:
        """Model records and every finished cell on disk: what a report of an unfinished run can show."""
        records = [{"kind": "model", "model": label, "model_key": self.model_key(label), **self._model_summary(label)}
                   for label in self.cfg.labels()
                   if label == FULL or is_compressed_artifact(self.model_path(label))]
        cells = sorted((self.root / "cells").glob("*.json"), key=lambda p: p.stat().st_mtime)
        for p in cells:
            try:
                records.append(read_json(p, "cached result"))
            except CTPError as e:  # a damaged cell is measured again by the next run; the report goes without it
                log.warning("%s; left out of the report", e.problem)
        return records

    def save(self, complete: bool) -> None:
        """Write results.json with every record so far (``complete`` once the whole grid is done)."""
        atomic_write_json(self.root / "results.json",
                          {"experiment": self.cfg.to_dict(), "complete": complete, "records": self.records})
        if self.on_save is not None:
            self.on_save(self.records)

    def _model_summary(self, label: str) -> dict:
        if label == FULL:
            return {"compression": None, "disk_bytes": None}
        path = Path(self.model_path(label))
        meta = read_json(path / COMPRESSED_MARKER, "compression metadata")
        disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        return {"compression": self.compress_config(label).label(), "disk_bytes": disk,
                "summary": meta.get("summary")}

    def _perplexity(self) -> None:
        cfg = self.cfg
        prompted = cfg.prompted()
        compare = list(cfg.prompt.compare or {}) if cfg.prompt else []
        transfer = cfg.transfer is not None and cfg.transfer.compression
        # group by target model so each model loads once
        for label in cfg.labels():
            refs: list[tuple[PromptRef, str]] = [(NONE, "none")]
            if cfg.perplexity.hard_prompt:
                refs.append((self.hard_ref(), "hard"))
            if label in prompted:
                refs.append((self.prompt_ref(label), "learned"))
                refs += [(self.prompt_ref(label, recipe=name), f"learned:{name}") for name in compare]
            if transfer and label in prompted:  # the matrix: every prompted level x every other's prompt, and its
                # diagonal and no-prompt row on the same (ablation) windows
                refs += [(self.prompt_ref(src), "transfer") for src in prompted if src != label]
                refs += [(self.prompt_ref(label), "transfer:own"), (NONE, "transfer:none")]
            for ref, role in refs:
                for d in cfg.perplexity.datasets:
                    self.ppl(label, ref, d, role)

    def _dataset_transfer(self) -> None:
        spec = self.cfg.transfer.datasets
        label = spec.model or (self.cfg.prompted() or [FULL])[0]
        for d in spec.train_on:
            self.ppl(label, self.prompt_ref(label, data=d), d, "direct")  # trains the prompt when it is missing
            self.ppl(label, self.prompt_ref(label), d, "transferred")
            self.ppl(label, NONE, d, "transfer:none")

    def _length_ablation(self) -> None:
        spec = self.cfg.length_ablation
        label = spec.model or (self.cfg.prompted() or [FULL])[0]
        data = spec.dataset or self.cfg.prompt.data
        datasets = self.cfg.perplexity.datasets if self.cfg.perplexity else [data]
        for k in spec.tokens:
            ref = NONE if k == 0 else self.prompt_ref(label, data=data, tokens=k)
            for d in datasets:
                self.ppl(label, ref, d, f"length{k}")

    def _zeroshot(self) -> None:
        z = self.cfg.zeroshot
        prompted = self.cfg.prompted()
        for label in z.models or self.cfg.labels():
            refs = [NONE] + ([self.hard_ref()] if z.hard_prompt else [])
            if label in prompted:
                refs.append(self.prompt_ref(label))
            for ref in refs:
                spec = {"model": label, "model_key": self.model_key(label), "prompt": ref.name,
                        "prompt_key": ref.key, "tasks": z.tasks, "limit": z.limit}

                def compute(label=label, ref=ref):
                    from ctp.eval.zeroshot import evaluate_tasks

                    model, tok, info = self.load(label)
                    prompt = self.prompt_tensor(ref, model, tok, info)
                    res = evaluate_tasks(model, tok, z.tasks, prompt=prompt, limit=z.limit,
                                         batch_size=z.batch_size, progress=self.progress)
                    return {"tasks_results": [r.to_dict() for r in res]}

                self.cell("zeroshot", spec, compute)

    def case_study_model(self) -> str:
        return self.cfg.case_study.model or (self.cfg.prompted() or list(self.cfg.compressions) or [FULL])[0]

    def _case_study(self) -> None:
        cs = self.cfg.case_study
        label = self.case_study_model()
        runs = [(FULL, NONE), (label, NONE), (label, self.hard_ref())]
        if label in self.cfg.prompted():
            runs.append((label, self.prompt_ref(label)))
            runs += [(label, self.prompt_ref(label, recipe=name)) for name in self.cfg.prompt.compare or {}]
        for model_label, ref in runs:
            spec = {"model": model_label, "model_key": self.model_key(model_label), "prompt": ref.name,
                    "prompt_key": ref.key, "questions": cs.questions, "max_new_tokens": cs.max_new_tokens}

            def compute(model_label=model_label, ref=ref):
                from ctp.prompt.generate import PrefixCachedGenerator, SamplingConfig

                model, tok, info = self.load(model_label)
                gen = PrefixCachedGenerator(model, tok, self.prompt_tensor(ref, model, tok, info))
                sampling = SamplingConfig(max_new_tokens=cs.max_new_tokens)  # greedy
                return {"answers": [gen.generate(q, sampling).text for q in cs.questions]}

            self.cell("generate", spec, compute)

    def _latency(self) -> None:
        from ctp.eval.latency import measure_latency

        lat = self.cfg.latency
        for label in lat.models or [FULL]:
            for k in lat.prompt_tokens:
                spec = {"model": label, "model_key": self.model_key(label), "prompt_tokens": k,
                        "context_len": lat.context_len, "new_tokens": lat.new_tokens, "device": self._device()}

                def compute(label=label, k=k):
                    model, _, _ = self.load(label)
                    d = model.get_input_embeddings().weight.shape[1]
                    prompt = None if k == 0 else torch.randn(k, d, generator=torch.Generator().manual_seed(0)) * 0.02
                    r = measure_latency(model, prompt, lat.context_len, lat.new_tokens, repeats=lat.repeats)
                    return r.to_dict()

                self.cell("latency", spec, compute)


def check_run_dir(root: Path, cfg: ExperimentConfig) -> None:
    """A run writes only into a new or empty directory, or an earlier run of the same experiment."""
    if not root.exists():
        return
    require(root.is_dir(), f"run directory {root} is a file", "pass another --out")
    marker = root / "experiment.json"
    if marker.is_file():
        try:
            earlier = read_json(marker, "experiment record").get("name")
        except (CTPError, AttributeError):
            earlier = None
        require(earlier == cfg.name, f"{root} holds a run of experiment '{earlier}', not '{cfg.name}'",
                "pass another --out for this experiment")
        return
    require(not any(root.iterdir()), f"{root} is a non-empty directory that is not a ctp run",
            "pass a new or empty directory with --out")


def model_slug(model: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(model).name or model)


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path | None = None, progress: bool = True,
                   report: bool = True, workers: int = 1) -> Path:
    """Run (or resume) an experiment and write its report; returns the run directory.

    With several ``models``, each runs in its own subdirectory ``<out>/<model>``
    and ``<out>/report.md`` links their reports. With ``workers`` > 1 that many
    processes share the grid first (see the module docstring); this process then
    measures the latency cells alone and writes the results and the report.
    """
    from ctp.experiments.report import write_index, write_report
    from ctp.models.load import check_model_spec

    require(isinstance(workers, int) and workers >= 1, f"workers {workers} must be at least 1",
            "pass --workers 1 or more (about one per CPU core, or per GPU)")
    root = Path(out_dir) if out_dir else Path("runs") / cfg.name
    configs = cfg.per_model()
    for sub in configs:  # a missing model or an unreachable hub id fails before anything is written
        check_model_spec(sub.model)
        check_run_dir(root if len(configs) == 1 else root / model_slug(sub.model), sub)
    check_output(root, *(c.model for c in configs), directory=True)
    if workers > 1:
        _run_workers(configs, root, workers)
    for sub in configs:
        sub_root = root if len(configs) == 1 else root / model_slug(sub.model)
        on_save = (lambda recs, sub=sub, sub_root=sub_root: write_report(sub, recs, sub_root)) if report else None
        Runner(sub, sub_root, progress=progress, on_save=on_save).run()
    if report and len(configs) > 1:
        write_index(cfg, [model_slug(c.model) for c in configs], root)
    return root


def _run_workers(configs: list[ExperimentConfig], root: Path, workers: int) -> None:
    """Run ``workers`` processes over the grid and wait for them; a one-line error if one of them failed."""
    import multiprocessing

    from ctp.models.load import resolve

    for sub in configs:
        resolve(sub.model)  # a named or GGUF model is converted into the cache once, before the workers read it
    root.mkdir(parents=True, exist_ok=True)
    level = logging.getLogger().getEffectiveLevel()
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch state shared with this one
    procs = [ctx.Process(target=_worker, args=(configs, str(root), i + 1, level), name=f"ctp-worker-{i + 1}")
             for i in range(workers)]
    log.info("%d worker processes share the grid; latency is measured after them, alone", workers)
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    failed = [(i + 1, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    if any(code == 130 for _, code in failed):
        raise KeyboardInterrupt
    require(not failed, "worker " + ", ".join(f"{i} stopped with exit code {c}" for i, c in failed),
            "read the worker's message above; rerun the same command to resume (finished work is kept)")


def _worker(configs: list[ExperimentConfig], root: str, index: int, level: int) -> None:
    """One worker process (the target of :func:`_run_workers`): exit 0 done, 2 on a ctp error, 130 on Ctrl-C."""
    import sys

    logging.basicConfig(level=level, format=f"[worker {index}] %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    quiet_third_party()
    os.environ["TQDM_DISABLE"] = "1"
    try:
        for sub in configs:
            Runner(sub, Path(root) if len(configs) == 1 else Path(root) / model_slug(sub.model),
                   progress=False, worker=True).work()
    except KeyboardInterrupt:
        sys.exit(130)
    except CTPError as e:
        print(f"ctp run: error: [worker {index}] {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
