"""The report of an experiment: Markdown tables in the paper's shapes, PNG plots, from results records.

Pure presentation: it reads the flat records that the runner wrote (``results.json``)
and never runs a model, so a report can be rebuilt at any time with
``ctp run FILE --report-only``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections import defaultdict
from pathlib import Path

from ctp.eval.stats import recovered_share
from ctp.experiments.config import FULL, ExperimentConfig
from ctp.io import atomic_write_text


def _fmt(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:.4g}"
        return f"{x:.{digits}f}"
    return str(x)


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _ppl_index(records: list[dict]) -> dict:
    """(model, role, prompt name, dataset) -> ppl."""
    return {k: r["ppl"] for k, r in _ppl_records(records).items()}


def _ppl_records(records: list[dict]) -> dict:
    """(model, role, prompt name, dataset) -> the perplexity record."""
    return {(r["model"], r["role"], r["prompt"], r["dataset"]): r for r in records if r.get("kind") == "ppl"}


def _get(idx: dict, model: str, role: str, dataset: str, prompt: str | None = None):
    for (m, ro, p, d), v in idx.items():
        if m == model and ro == role and d == dataset and (prompt is None or p == prompt):
            return v
    return None


def _with_ci(r: dict | None) -> str:
    """'79.00 (75.12–83.20)': the perplexity and its 95% interval over windows, when the record has one."""
    if r is None:
        return "–"
    if r.get("ppl_low") is None or r.get("n_windows", 0) < 2:
        return _fmt(r["ppl"])
    return f"{_fmt(r['ppl'])} ({_fmt(r['ppl_low'])}–{_fmt(r['ppl_high'])})"


def _share_cell(recs: dict, label: str, role: str, dataset: str) -> str:
    """The recovered share of the gap of ``label`` with the prompt of ``role`` on ``dataset``, with its interval."""
    full, none, prompt = (_get(recs, FULL, "none", dataset), _get(recs, label, "none", dataset),
                          _get(recs, label, role, dataset))
    if not (full and none and prompt) or not all(x.get("window_nll") for x in (full, none, prompt)):
        return "–"
    s, lo, hi = recovered_share(none["window_nll"], prompt["window_nll"], full["window_nll"])
    if math.isnan(s):
        return "–"
    verdict = "" if lo > 0 or hi < 0 else " (no clear change)"
    return f"{100 * s:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]{verdict}"


def _savefig(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` atomically and close it."""
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)
    _plt().close(fig)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass
class _View:
    """The records indexed the ways the report's sections read them."""

    idx: dict
    recs: dict
    models: list[dict]
    comp_label: dict[str, str]
    prompted: list[str]


def write_report(cfg: ExperimentConfig, records: list[dict], root: str | Path) -> Path:
    """Write ``report.md`` and its plots into ``root``; returns the report path."""
    root = Path(root)
    models = [r for r in records if r.get("kind") == "model"]
    view = _View(idx=_ppl_index(records), recs=_ppl_records(records), models=models,
                 comp_label={r["model"]: (r.get("compression") or "uncompressed") for r in models},
                 prompted=cfg.prompted())
    parts: list[str] = [f"# Experiment `{cfg.name}`", ""]
    parts.append(f"Model: `{cfg.model}`. Every number below was measured by `ctp run` from the experiment "
                 f"file stored beside this report (`experiment.json`); raw records are in `results.json`.")
    parts.append("")
    for section in _SECTIONS:
        parts += section(cfg, records, view, root)
    path = root / "report.md"
    atomic_write_text(path, "\n".join(parts))
    return path


def _compression_section(cfg: ExperimentConfig, records: list[dict], v: _View, root: Path) -> list[str]:
    """The report's compression summary section (empty when the experiment has none)."""
    models, comp_label = v.models, v.comp_label
    parts: list[str] = []
    if models:
        rows = []
        for r in models:
            s = r.get("summary") or {}
            rows.append([r["model"], comp_label[r["model"]],
                         None if r.get("disk_bytes") is None else r["disk_bytes"] / 2**20,
                         s.get("sparsity"), s.get("seconds")])
        parts += ["## Compressed models", "",
                  _table(["label", "compression", "size on disk (MiB)", "sparsity", "compress time (s)"], rows), ""]
    return parts


def _perplexity_section(cfg: ExperimentConfig, records: list[dict], v: _View, root: Path) -> list[str]:
    """The report's main perplexity table section (empty when the experiment has none)."""
    idx, recs, comp_label = v.idx, v.recs, v.comp_label
    parts: list[str] = []
    if cfg.perplexity:
        p = cfg.perplexity
        ds = p.datasets
        # the columns this experiment measures: none always, hard and learned when asked for
        compare = list(cfg.prompt.compare or {}) if cfg.prompt and cfg.prompted() else []
        roles = (["none"] + (["hard"] if p.hard_prompt else []) + (["learned"] if cfg.prompted() else [])
                 + [f"learned:{c}" for c in compare])
        what = {"none": "without a prompt", "hard": "with the paper's hard prompt",
                "learned": (f"with the prompt learned on this model ({_recipe_text(cfg)}, trained on "
                            f"{cfg.prompt.data} train)" if cfg.prompt else "")}
        what.update({f"learned:{c}": f"with the '{c}' recipe ({_recipe_text(cfg, c)})" for c in compare})
        sentence = ", ".join(what[r] for r in roles[:-1]) + (" and " if len(roles) > 1 else "") + what[roles[-1]]
        n_tokens = {d: next((r["n_tokens"] for k, r in recs.items() if k[3] == d), None) for d in ds}
        parts += [f"## Perplexity ({p.split} split, seqlen {p.seqlen}"
                  + (f", at most {p.max_windows} windows" if p.max_windows else "") + ")", "",
                  sentence[0].upper() + sentence[1:] + ". In brackets: the 95% confidence interval over windows. "
                  "Tokens scored per dataset: " + ", ".join(f"{d} {n_tokens[d]}" for d in ds) + ".", ""]
        header = ["model", "compression"] + [f"{d} {r}" if len(roles) > 1 else d for d in ds for r in roles]
        rows = [[label, comp_label.get(label, "")] + [_with_ci(_get(recs, label, r, d)) for d in ds for r in roles]
                for label in cfg.labels()]
        parts += [_table(header, rows), ""]
        prompt_roles = [r for r in roles if r != "none"]
        share_rows = [[label, r] + [_share_cell(recs, label, r, d) for d in ds]
                      for label in cfg.labels() if label != FULL for r in prompt_roles
                      if any(_get(recs, label, r, d) for d in ds)]
        if share_rows and any(_get(recs, FULL, "none", d) for d in ds):
            parts += ["### Recovered share of the compression gap", "",
                      "(NLL without prompt - NLL with it) / (NLL without prompt - NLL of the full model), on the same "
                      "test windows: 0% is no recovery, 100% the full model's perplexity. In brackets the 95% "
                      "paired-bootstrap interval over windows; an interval that contains 0 is marked as no clear "
                      "change.", "", _table(["model", "prompt", *ds], share_rows), ""]
        fig_path = _plot_ppl(cfg, idx, root)
        if fig_path:
            parts += [f"![perplexity versus compression]({fig_path.name})", ""]
    return parts


def _ablation_windows_text(cfg: ExperimentConfig) -> str:
    """How many windows the transfer and length-ablation cells score, when that differs from the main table."""
    p = cfg.perplexity
    if p is None or p.ablation_windows is None or p.ablation_windows == p.max_windows:
        return ""
    return (f" Scored on the first {p.ablation_windows} windows of {p.seqlen} tokens of each {p.split} split "
            f"({p.ablation_windows * (p.seqlen - 1)} tokens), every number in this table on the same windows.")


def _compression_transfer_section(cfg: ExperimentConfig, records: list[dict], v: _View, root: Path) -> list[str]:
    """The report's cross-compression transfer section (empty when the experiment has none)."""
    idx, prompted = v.idx, v.prompted
    parts: list[str] = []
    if cfg.perplexity and cfg.transfer and cfg.transfer.compression and len(prompted) > 1:
        parts += ["## Cross-compression transfer", "",
                  "Perplexity of each target model (columns) with the prompt learned on each source model (rows); "
                  "the diagonal is the model's own prompt, the last row no prompt." + _ablation_windows_text(cfg), ""]
        for d in cfg.perplexity.datasets:
            matrix = _transfer_matrix(idx, prompted, d)
            rows = [[f"source {s}"] + [matrix[s].get(t) for t in prompted] for s in prompted]
            rows.append(["no prompt"] + [_get(idx, t, "transfer:none", d) or _get(idx, t, "none", d) for t in prompted])
            parts += [f"**{d}**", "", _table(["prompt \\ target"] + prompted, rows), ""]
        fig_path = _plot_transfer(cfg, idx, prompted, root)
        parts += [f"![transfer heat map]({fig_path.name})", ""]
    return parts


def _dataset_transfer_section(cfg: ExperimentConfig, records: list[dict], v: _View, root: Path) -> list[str]:
    """The report's cross-dataset transfer (Table 4) section (empty when the experiment has none)."""
    idx, prompted = v.idx, v.prompted
    parts: list[str] = []
    if cfg.transfer and cfg.transfer.datasets and cfg.prompt:
        spec = cfg.transfer.datasets
        label = spec.model or (prompted or [FULL])[0]
        rows = []
        for role, name in (("transfer:none", "no prompt"), ("direct", "prompt learned on the target set"),
                           ("transferred", f"prompt learned on {cfg.prompt.data}, transferred")):
            rows.append([name] + [_get(idx, label, role, d) or (_get(idx, label, "none", d) if role == "transfer:none"
                                                                 else None) for d in spec.train_on])
        parts += [f"## Cross-dataset transfer ({label})", ""]
        note = _ablation_windows_text(cfg).strip()
        parts += [note, ""] if note else []
        parts += [_table(["", *spec.train_on], rows), ""]
    return parts


def _length_section(cfg: ExperimentConfig, records: list[dict], v: _View, root: Path) -> list[str]:
    """The report's prompt length ablation (Table 1) section (empty when the experiment has none)."""
    idx, prompted = v.idx, v.prompted
    parts: list[str] = []
    if cfg.length_ablation and cfg.prompt:
        la = cfg.length_ablation
        label = la.model or (prompted or [FULL])[0]
        datasets = cfg.perplexity.datasets if cfg.perplexity else [la.dataset or cfg.prompt.data]
        rows = [[("baseline (0 tokens)" if k == 0 else f"{k} tokens")] + [_get(idx, label, f"length{k}", d) for d in datasets]
                for k in la.tokens]
        parts += [f"## Prompt length ablation ({label})", ""]
        note = _ablation_windows_text(cfg).strip()
        parts += [note, ""] if note else []
        parts += [_table(["# tokens", *datasets], rows), ""]
        fig_path = _plot_length(cfg, idx, label, datasets, root)
        parts += [f"![perplexity versus prompt length]({fig_path.name})", ""]
    return parts


def _zeroshot_section(cfg: ExperimentConfig, records: list[dict], v: _View, root: Path) -> list[str]:
    """The report's zero-shot (Table 5) section (empty when the experiment has none)."""
    parts: list[str] = []
    zs = [r for r in records if r.get("kind") == "zeroshot"]
    if zs:
        tasks = cfg.zeroshot.tasks
        rows = []
        for r in zs:
            by_task = {t["task"]: t for t in r["tasks_results"]}
            row = [r["model"], r["prompt"]]
            for t in tasks:
                tr = by_task.get(t)
                row.append("–" if tr is None else f"{tr['acc_norm']:.3f} ± {tr['acc_norm_stderr']:.3f}")
            rows.append(row)
        n = zs[0]["tasks_results"][0]["n"] if zs[0]["tasks_results"] else 0
        parts += ["## Zero-shot accuracy (acc_norm ± standard error)", "",
                  f"{n} items per task" + (f" (limit {cfg.zeroshot.limit})" if cfg.zeroshot.limit else "") + "; "
                  "the learned prompt was trained for language modelling only (cross-task transfer).", "",
                  _table(["model", "prompt", *tasks], rows), ""]
    return parts


def _latency_section(cfg: ExperimentConfig, records: list[dict], v: _View, root: Path) -> list[str]:
    """The report's latency (A.4) section (empty when the experiment has none)."""
    parts: list[str] = []
    lat = [r for r in records if r.get("kind") == "latency"]
    if lat:
        rows = [[r["model"], r["prompt_tokens"], r["context_len"], r["prefill_s"] * 1e3, r["prefill_cached_s"] * 1e3,
                 r["per_token_s"] * 1e3] for r in lat]
        parts += [f"## Latency of prompt tokens (device: {lat[0]['device']})", "",
                  "Prefill of prompt + context recomputing the prompt each request, prefill with the prompt's "
                  "keys and values cached once (prefix caching), and one decoding step with the KV cache; "
                  "medians in milliseconds.", "",
                  _table(["model", "prompt tokens", "context", "prefill (ms)", "prefill, cached prompt (ms)",
                          "per token (ms)"], rows), ""]
        fig_path = _plot_latency(lat, root)
        parts += [f"![latency versus prompt length]({fig_path.name})", ""]
    return parts


def _case_study_section(cfg: ExperimentConfig, records: list[dict], v: _View, root: Path) -> list[str]:
    """The report's case study (Figures 1, 7, 8) section (empty when the experiment has none)."""
    parts: list[str] = []
    gens = [r for r in records if r.get("kind") == "generate"]
    if gens and cfg.case_study:
        parts += ["## Case study: greedy answers", "",
                  f"The paper's qualitative comparison (its Figures 1, 7 and 8): each model answers the same "
                  f"questions with greedy decoding, at most {cfg.case_study.max_new_tokens} new tokens.", ""]
        for i, q in enumerate(cfg.case_study.questions):
            rows = [[r["model"], r["prompt"], _oneline(r["answers"][i])] for r in gens if i < len(r["answers"])]
            parts += [f"**{q}**", "", _table(["model", "prompt", "answer"], rows), ""]
    return parts


_SECTIONS = (_compression_section, _perplexity_section, _compression_transfer_section, _dataset_transfer_section, _length_section, _zeroshot_section, _latency_section, _case_study_section)


def _oneline(text: str) -> str:
    """An answer fit for a table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|") or "(empty)"


def _recipe_text(cfg: ExperimentConfig, name: str | None = None) -> str:
    """e.g. '25-token prefix, objective kd, 60 steps'."""
    r = cfg.prompt.recipe(name)
    steps = r["train"].get("steps")
    return (f"{r['tokens']}-token {r['kind']} prompt, objective {r['train'].get('objective', 'nll')}"
            + (f", {steps} steps" if steps else ""))


def write_index(cfg: ExperimentConfig, slugs: list[str], root: str | Path) -> Path:
    """The top-level report of a several-model experiment: links to each model's report."""
    lines = [f"# Experiment `{cfg.name}`", "", "One report per model:", ""]
    lines += [f"- [{s}]({s}/report.md)" for s in slugs]
    path = Path(root) / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _transfer_matrix(idx: dict, prompted: list[str], dataset: str) -> dict:
    """source -> target -> perplexity; a prompt's name starts with its source label and '@'."""
    m: dict = defaultdict(dict)
    for (target, role, prompt, d), v in idx.items():
        if d != dataset or target not in prompted:
            continue
        if role == "transfer:own" or (role == "learned" and target not in m[target]):
            m[target][target] = v  # on the transfer cells' windows (runs before they existed: the main cell)
        elif role == "transfer":
            m[prompt.split("@", 1)[0]][target] = v
    return m


def _plot_ppl(cfg: ExperimentConfig, idx: dict, root: Path) -> Path | None:
    compressed = list(cfg.compressions)
    if not compressed:
        return None
    plt = _plt()
    ds = cfg.perplexity.datasets
    fig, axes = plt.subplots(1, len(ds), figsize=(5 * len(ds), 4), squeeze=False)
    for ax, d in zip(axes[0], ds):
        x = range(len(compressed))
        for role, style in (("none", "o-"), ("hard", "s--"), ("learned", "^-")):
            y = [_get(idx, label, role, d) for label in compressed]
            if any(v is not None for v in y):
                ax.plot(x, [math.nan if v is None else v for v in y], style, label=f"{role} prompt")
        full = _get(idx, FULL, "none", d)
        if full is not None:
            ax.axhline(full, color="green", lw=1, label="full model")
        ax.set_xticks(list(x), compressed, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_title(d)
        ax.set_ylabel("perplexity")
        ax.legend(fontsize=8)
    path = root / "ppl_vs_compression.png"
    return _savefig(fig, path)


def _plot_transfer(cfg: ExperimentConfig, idx: dict, prompted: list[str], root: Path) -> Path:
    plt = _plt()
    ds = cfg.perplexity.datasets
    fig, axes = plt.subplots(1, len(ds), figsize=(4.5 * len(ds), 4), squeeze=False)
    for ax, d in zip(axes[0], ds):
        m = _transfer_matrix(idx, prompted, d)
        grid = [[math.nan if m[s].get(t) is None else m[s][t] for t in prompted] for s in prompted]
        im = ax.imshow([[math.log(v) if v == v else math.nan for v in row] for row in grid], cmap="viridis_r")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, _fmt(v, 1), ha="center", va="center", color="white", fontsize=8)
        ax.set_xticks(range(len(prompted)), prompted, rotation=30, ha="right")
        ax.set_yticks(range(len(prompted)), prompted)
        ax.set_xlabel("target model")
        ax.set_ylabel("prompt source")
        ax.set_title(f"{d} perplexity")
        fig.colorbar(im, ax=ax, label="log perplexity", fraction=0.046)
    path = root / "transfer_heatmap.png"
    return _savefig(fig, path)


def _plot_length(cfg: ExperimentConfig, idx: dict, label: str, datasets: list[str], root: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    ks = cfg.length_ablation.tokens
    for d in datasets:
        y = [_get(idx, label, f"length{k}", d) for k in ks]
        ax.plot(ks, [math.nan if v is None else v for v in y], "o-", label=d)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("perplexity")
    ax.set_title(f"prompt length ablation ({label})")
    ax.legend()
    path = root / "length_ablation.png"
    return _savefig(fig, path)


def _plot_latency(lat: list[dict], root: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    by_model: dict = defaultdict(list)
    for r in lat:
        by_model[r["model"]].append(r)
    for model, rs in by_model.items():
        rs = sorted(rs, key=lambda r: r["prompt_tokens"])
        ks = [r["prompt_tokens"] for r in rs]
        axes[0].plot(ks, [r["prefill_s"] * 1e3 for r in rs], "o-", label=f"{model}")
        axes[0].plot(ks, [r["prefill_cached_s"] * 1e3 for r in rs], "s--", label=f"{model}, cached prompt")
        axes[1].plot(ks, [r["per_token_s"] * 1e3 for r in rs], "o-", label=model)
    axes[0].set_title(f"prefill of {lat[0]['context_len']} context tokens")
    axes[1].set_title("one decoding step (KV cache)")
    for ax in axes:
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("milliseconds")
        ax.legend(fontsize=8)
    path = root / "latency.png"
    return _savefig(fig, path)
