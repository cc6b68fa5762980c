"""`lcdistill report`: a run's training curves, teacher/student/export table and Lipschitz chart,
as PNG files and one self-contained report.html (the PNGs embedded as base64)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

from lcdistill.artifacts import identify
from lcdistill.checkpoint import atomic_write, atomic_write_text
from lcdistill.errors import UserError
from lcdistill.models.transfer import init_line
from lcdistill.robustness import NOTE, columns
from lcdistill.runfolder import RunFolder, exported_files

NOT_LOSSES = {"epoch", "lr", "img_per_s", "skipped_images", "lip_gap"}


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or the advice to install the extra."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("lcdistill report needs matplotlib", "pip install 'lcdistill[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_summary(run: Path) -> list[dict]:
    """summary.csv as one dict of floats per epoch (empty cells left out)."""
    path = RunFolder(run).summary
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def read_json(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not a JSON file", "write it again with `lcdistill eval ... --save` or `lcdistill lipschitz ... --json`") from None


def loss_parts(rows: list[dict]) -> list[str]:
    """The loss columns of summary.csv: everything that is not a setting, a rate or a val metric."""
    names: list[str] = []
    for row in rows:
        names += [k for k in row if k not in names and k not in NOT_LOSSES and not k.startswith(("val_", "ema_"))]
    return names


def save_png(fig, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    fig.clf()
    return path


def plot_losses(plt, rows: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name in loss_parts(rows):
        points = [(r["epoch"], r[name]) for r in rows if name in r]
        ax.plot(*zip(*points), marker="o", label=name)
    ax.set(xlabel="epoch", ylabel="training loss (epoch mean)", title="weighted loss parts ('loss' is their sum)")
    whole_epochs(ax)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, path)


def whole_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_metric(plt, rows: list[dict], key: str, header: str, teacher_value: float | None, path: Path) -> Path:
    """The task metric's checkpoint-picking value per epoch (top-1, mIoU), the teacher's as a line."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for column, label in ((f"val_{key}", "student"), (f"ema_{key}", "student EMA")):
        points = [(r["epoch"], r[column]) for r in rows if column in r]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    if teacher_value is not None:
        ax.axhline(teacher_value, color="black", linestyle="--", label=f"teacher {teacher_value:.2f}")
    ax.set(xlabel="epoch", ylabel=f"val {header}", title=f"validation {header.removesuffix(' %')}")
    whole_epochs(ax)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, path)


def plot_lipschitz(plt, lip: dict, path: Path) -> Path:
    """Per-stage transmitting-matrix spectral norms: the student (own maps and, for london, through its
    connectors) beside the teacher."""
    import numpy as np

    stages = lip["stages"]
    x = np.arange(len(stages))
    bars = [("student", [s["model"] for s in stages])]
    connected = any(s.get("connected") is not None for s in stages)  # a london run: what the Lipschitz term matched
    if connected:
        bars.append(("student via connectors", [np.nan if s.get("connected") is None else s["connected"] for s in stages]))  # nan: a left-out matrix
    if any(s.get("teacher") is not None for s in stages):
        bars.append(("teacher", [s["teacher"] or 0 for s in stages]))
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (label, values) in enumerate(bars):
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, values, width, label=label)
    left_out = [(i, s["connected_note"]) for i, s in enumerate(stages) if connected and s.get("connected") is None and s.get("connected_note")]
    for i, _ in left_out:  # where the bar would stand: say why there is none
        ax.annotate("not matched\nin training*", (x[i] + (1 - (len(bars) - 1) / 2) * width, 0), xytext=(0, 4), textcoords="offset points", ha="center", va="bottom",
                    fontsize=7, rotation=90, color="C1")
    ax.set_xticks(x, [s["name"] for s in stages], rotation=15)
    ax.set(ylabel="TM spectral norm (val mean)", title="per-stage Lipschitz estimate")
    if left_out:
        fig.text(0.01, -0.04, "\n".join(f"* {stages[i]['name']}: {note}" for i, note in left_out), fontsize=7, ha="left", va="top", wrap=True)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return save_png(fig, path)


def plot_side_by_side(plt, rows: list[dict], key: str, header: str, path: Path) -> Path | None:
    """The metric of each measured model and file as bars (teacher, student, fp32 / int8 / quantization-aware
    files), its value on each bar; None with fewer than two."""
    rows = [r for r in rows if isinstance(r.get(key), (int, float))]
    if len(rows) < 2:
        return None
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(rows)), 3.4))
    values = [r[key] for r in rows]
    bars = ax.bar(range(len(rows)), values, color=[f"C{i}" for i in range(len(rows))])
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=8)
    ax.set_xticks(range(len(rows)), [r["role"] for r in rows], rotation=20, ha="right", fontsize=8)
    low = min(values)
    ax.set_ylim(max(0.0, low - max(5.0, 0.5 * (max(values) - low) + 2)), max(values) + 2)  # the differences, not the 0-90 part
    ax.set(ylabel=header, title=f"val {header.removesuffix(' %')} side by side")
    ax.grid(alpha=0.3, axis="y")
    return save_png(fig, path)


def robustness_rows(evaluation: dict | None) -> dict[str, dict]:
    """role -> the "robustness" entry of `lcdistill eval --robustness --save` (teacher first)."""
    order = sorted(evaluation or {}, key=lambda role: role != "teacher")
    return {role: evaluation[role]["robustness"] for role in order if isinstance(evaluation[role], dict) and "robustness" in evaluation[role]}


def plot_robustness(plt, rows: dict[str, dict], header: str, path: Path) -> Path:
    """The metric against noise sigma and FGSM epsilon (0: clean), one line per model."""
    fig, (noise_ax, fgsm_ax) = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for color, (role, r) in enumerate(rows.items()):
        for ax, kind, scale in ((noise_ax, "noise", 1.0), (fgsm_ax, "fgsm", 255.0)):
            if r.get(kind):
                levels = sorted((float(k), v) for k, v in r[kind].items())
                ax.plot([0.0] + [k * scale for k, _ in levels], [r["clean"]] + [v for _, v in levels], marker="o", label=role, color=f"C{color}")
    noise_ax.set(xlabel="Gaussian noise sigma ([0, 1] pixels)", ylabel=header, title="under noise")
    fgsm_ax.set(xlabel="FGSM epsilon (x 1/255)", title="under one-step FGSM (PyTorch models)")
    for ax in (noise_ax, fgsm_ax):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    return save_png(fig, path)


def robustness_table(rows: dict[str, dict]) -> str:
    """The metric clean and per level, one row per model ('-': not measured, e.g. FGSM of an exported file)."""
    levels = columns(rows.values())
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["", "clean", *(label for _, _, label in levels)])
    body = "".join(f"<tr><td>{html.escape(role)}</td><td>{r['clean']:.2f}</td>"
                   + "".join(f"<td>{cell(r.get(kind, {}).get(k), '{:.2f}')}</td>" for kind, k, _ in levels) + "</tr>" for role, r in rows.items())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def table_rows(meta: dict, evaluation: dict | None, run: Path, keys: list[str]) -> list[dict]:
    """Teacher, student and export rows: eval.json's measurements when there are some, else what
    student.json recorded at the end of training plus the sizes of any exported files."""
    if evaluation:
        order = ["teacher", "student"] + [k for k in evaluation if k not in ("teacher", "student")]
        return [{"role": k, **evaluation[k]} for k in order if k in evaluation]
    rows = []
    if meta.get("teacher"):
        t = meta["teacher"]
        rows.append({"role": "teacher", "model": t.get("origin"), **{k: t.get(k) for k in keys}, "params": t.get("params")})
    rows.append({"role": "student", "model": f"{meta['arch']['source']}:{meta['arch']['name']}", **{k: meta.get(k) for k in keys},
                 "params": meta.get("params"), "file_bytes": RunFolder(run).student.stat().st_size})
    for path in exported_files(run):
        rows.append({"role": path.name, "model": path.name, "file_bytes": path.stat().st_size})
    return rows


LEFT = [("", "role", "{}"), ("model", "model", "{}"), ("runs on", "kind", "{}")]  # (header, key, format)
RIGHT = [
    ("params", "params", lambda v: f"{v / 1e6:.2f}M"), ("GFLOPs", "flops", lambda v: f"{v / 1e9:.3f}"),
    ("file MB", "file_bytes", lambda v: f"{v / 1e6:.2f}"), ("ms @1", "latency_ms_b1", "{:.2f}"),
    ("ms @batch", "latency_ms_batch", "{:.2f}"), ("img/s", "throughput_img_s", "{:,.0f}"),
]


def cell(value, fmt) -> str:
    if value is None:
        return "-"
    return fmt(value) if callable(fmt) else fmt.format(value)


def html_table(rows: list[dict], metric_columns) -> str:
    columns = LEFT + [(h, k, "{:.2f}") for h, k in metric_columns] + RIGHT
    used = [c for c in columns if any(r.get(c[1]) is not None for r in rows)]
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _, _ in used)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(r.get(k), f))}</td>" for _, k, f in used) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def embedded(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


STYLE = ("body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:0.3em 0.6em;text-align:right}"
         "td:first-child,td:nth-child(2),th:first-child{text-align:left}figure{display:inline-block;margin:0.5em}"
         "img{max-width:100%}.note{color:#666;font-size:0.9em}")


def write(run: Path, evaluation: dict | None = None, lipschitz: dict | None = None) -> dict:
    """Write RUN/plots/*.png and RUN/report.html; returns {"html": path, "plots": [paths]}."""
    run = Path(run)
    target = identify(run, accept=("run",))
    folder = RunFolder(run)
    plt = pyplot()
    meta = target.meta
    metric = target.task.metric(len(meta["classes"]))
    header = metric.best_header
    evaluation = evaluation if evaluation is not None else read_json(folder.eval)
    lipschitz = lipschitz if lipschitz is not None else read_json(folder.lipschitz)
    rows = read_summary(run)
    teacher_value = (meta.get("teacher") or {}).get(metric.best)
    curves, lip_plots = [], []
    if rows:
        curves.append((plot_losses(plt, rows, folder.plots / "loss.png"), "training loss parts per epoch"))
        name = header.removesuffix(" %")
        curves.append((plot_metric(plt, rows, metric.best, header, teacher_value, folder.plots / f"{metric.best}.png"),
                       f"student val {name} per epoch" + (f" (dashed: the teacher's {name})" if teacher_value is not None else "")))
    table = table_rows(meta, evaluation, run, [k for _, k in metric.columns])
    side = plot_side_by_side(plt, table, metric.best, header, folder.plots / "side_by_side.png") if evaluation else None
    side_plots = [(side, f"val {header.removesuffix(' %')} of the teacher, the student and its exported files (fp32, post-training and quantization-aware int8)")] if side else []
    robust = robustness_rows(evaluation)
    robust_plots = [(plot_robustness(plt, robust, header, folder.plots / "robustness.png"), f"val {header.removesuffix(' %')} under input noise and FGSM")] if robust else []
    if lipschitz and lipschitz.get("stages"):
        lip_plots.append((plot_lipschitz(plt, lipschitz, folder.plots / "lipschitz.png"), "per-stage transmitting-matrix spectral norms on val images"))
    plt.close("all")

    arch = meta["arch"]
    facts = {"student": f"{arch['source']}:{arch['name']}", "method": meta.get("method"), "epochs": meta.get("epochs"),
             "teacher": (meta.get("teacher") or {}).get("origin"), "input size": "x".join(map(str, meta["input_size"])),
             "classes": meta.get("num_classes"), "started from": init_line(meta["init"]) if meta.get("init") else None,
             "lcdistill": meta.get("lcdistill_version")}
    facts_html = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in facts.items() if v is not None)
    source = ("measured by <code>lcdistill eval</code> (eval.json)" if evaluation
              else "recorded at the end of training (student.json); run <code>lcdistill eval RUN --data DIR --save RUN/eval.json</code> for latency and export rows")
    if lip_plots:
        bound = lipschitz.get("upper_bound")
        lip_html = "".join(embedded(p, alt) for p, alt in lip_plots) + (
            f"<p class=note>per-layer upper bound (product of exact layer norms): {bound:.3e}</p>" if bound else "")
    else:
        lip_html = "<p class=note>None: save <code>lcdistill lipschitz RUN --data DIR --json</code> as RUN/lipschitz.json, or pass --data.</p>"
    out = io.StringIO()
    out.write(f"<!doctype html><html><head><meta charset=utf-8><title>lcdistill report: {html.escape(run.name)}</title><style>{STYLE}</style></head><body>")
    out.write(f"<h1>lcdistill report: {html.escape(str(run))}</h1><ul>{facts_html}</ul>")
    out.write(f"<h2>Teacher, student and exports</h2><p class=note>{source}</p>{html_table(table, metric.columns)}"
              + "".join(embedded(p, alt) for p, alt in side_plots))
    out.write("<h2>Training</h2>" + ("".join(embedded(p, alt) for p, alt in curves) if curves else "<p class=note>No summary.csv.</p>"))
    out.write(f"<h2>Lipschitz constants</h2>{lip_html}")
    if robust:
        out.write("<h2>Robustness</h2>" + "".join(embedded(p, alt) for p, alt in robust_plots) + robustness_table(robust)
                  + f"<p class=note>{html.escape(NOTE)}</p>")
    out.write("</body></html>\n")
    atomic_write_text(folder.report, out.getvalue())
    return {"html": folder.report, "plots": [p for p, _ in curves + side_plots + lip_plots + robust_plots]}
