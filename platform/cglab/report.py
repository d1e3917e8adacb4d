"""`cglab report --lesson N`: read a lesson's sweep back from MLflow and write one HTML page: the
variants x metrics table, loss-vs-tokens curves, and the verdict against the paper's finding."""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path

from cglab.tune.lessons import Lesson, Outcome, get_lesson, verdict

LOSS_KEYS = ("train/loss", "loss")


@dataclass
class LessonRuns:
    lesson: Lesson
    sweep: str
    experiment_id: str
    parent_run_id: str
    metrics: dict[str, dict[str, float]]  # variant -> metric -> mean over seeds (finished runs)
    seeds: dict[str, list[str]]
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # variant -> (tokens, loss)
    status: dict[str, list[str]] = field(default_factory=dict)

    @property
    def metric_keys(self) -> list[str]:
        keys = {k for m in self.metrics.values() for k in m}
        decide = [m.key for m in self.lesson.metrics if m.key in keys]
        rest = sorted(k for k in keys if k not in decide and (k.startswith("eval/") or k == "loss"))
        return decide + rest


def collect(lesson: Lesson | int, tracking_uri: str, sweep: str | None = None) -> LessonRuns:
    """The latest sweep of the lesson (or the named one), its trials grouped by variant."""
    from mlflow import MlflowClient

    les = lesson if isinstance(lesson, Lesson) else get_lesson(lesson)
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(les.experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment {les.experiment!r} at {tracking_uri}; run `cglab ablate "
                          f"{les.number}` first")
    flt = "tags.`cglab.role` = 'sweep'" + (f" and tags.`cglab.sweep` = '{sweep}'" if sweep else "")
    parents = client.search_runs([exp.experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"],
                                 max_results=1)
    if not parents:
        raise LookupError(f"no sweep {'named ' + repr(sweep) + ' ' if sweep else ''}in {les.experiment!r}")
    parent = parents[0]
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  max_results=1000)
    sums: dict[str, dict[str, list[float]]] = {}
    seeds: dict[str, list[str]] = {}
    status: dict[str, list[str]] = {}
    curves: dict[str, list[tuple[float, float]]] = {}
    for run in children:
        v = run.data.tags.get("variant", run.info.run_name)
        status.setdefault(v, []).append(run.info.status)
        if run.info.status != "FINISHED":
            continue
        seeds.setdefault(v, []).append(run.data.tags.get("seed", "?"))
        for k, x in run.data.metrics.items():
            sums.setdefault(v, {}).setdefault(k, []).append(x)
        if v not in curves:  # the first seed's curve stands for the variant
            curves[v] = _curve(client, run)
    means = {v: {k: sum(xs) / len(xs) for k, xs in ms.items()} for v, ms in sums.items()}
    order = [x.name for x in les.variants if x.name in means or x.name in status]
    return LessonRuns(les, parent.data.tags.get("cglab.sweep", parent.info.run_name), exp.experiment_id,
                      parent.info.run_id, {v: means.get(v, {}) for v in order}, seeds, curves, status)


def _curve(client, run) -> list[tuple[float, float]]:
    p = run.data.params
    try:
        tokens_per_step = int(p["train.global_batch_size"]) * int(p["data.seq_length"])
    except (KeyError, ValueError):
        tokens_per_step = 1  # unknown batch shape: x axis falls back to steps
    for key in LOSS_KEYS:
        hist = client.get_metric_history(run.info.run_id, key)
        if len(hist) > 1:
            return sorted((m.step * tokens_per_step, m.value) for m in hist)
    return []


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4g}"


def text_table(runs: LessonRuns) -> str:
    keys = runs.metric_keys
    rows = [["variant", "seeds", *keys]]
    for v, m in runs.metrics.items():
        rows.append([v, str(len(runs.seeds.get(v, []))), *(_fmt(m.get(k)) for k in keys)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdict_lines(runs: LessonRuns) -> list[str]:
    out = []
    for o in verdict(runs.lesson, runs.metrics):
        out.append(_verdict_line(o))
    return out


def _verdict_line(o: Outcome) -> str:
    if o.winner is None:
        return f"{o.metric}: not measured"
    if o.margin_rel == 0:
        return f"{o.metric}: tie between {o.winner} and {o.runner_up}; paper expects {' or '.join(o.paper_best)}"
    by = f" by {o.margin_rel:.1%} over {o.runner_up}" if o.margin_rel is not None else ""
    agree = {True: "agrees with the paper", False: "disagrees with the paper"}[bool(o.agrees)]
    note = f" ({o.note})" if o.note else ""
    return f"{o.metric}: {o.winner} wins{by}; paper expects {' or '.join(o.paper_best)}: {agree}{note}"


def plot_curves(runs: LessonRuns, path: Path) -> Path | None:
    if not any(runs.curves.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for v, pts in runs.curves.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=v)
    ax.set_xlabel("tokens")
    ax.set_ylabel("training loss")
    ax.set_title(f"Lesson {runs.lesson.number}: {runs.lesson.question}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_html(runs: LessonRuns, tracking_uri: str, png_name: str | None) -> str:
    les, e = runs.lesson, html.escape
    keys = runs.metric_keys
    head = "".join(f"<th>{e(k)}</th>" for k in ["variant", "seeds", "status", *keys])
    body = "".join(
        "<tr>" + "".join(f"<td>{e(c)}</td>" for c in [
            v, str(len(runs.seeds.get(v, []))), ",".join(sorted(set(runs.status.get(v, [])))),
            *(_fmt(m.get(k)) for k in keys)]) + "</tr>"
        for v, m in runs.metrics.items())
    verdicts = "".join(f"<li>{e(line)}</li>" for line in verdict_lines(runs))
    img = f'<img src="{e(png_name)}" alt="loss vs tokens">' if png_name else "<p>No loss curves logged.</p>"
    link = f"{tracking_uri}/#/experiments/{runs.experiment_id}/runs/{runs.parent_run_id}"
    fixed = ", ".join(les.fixed)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>CodeGen2 lesson {les.number}: {e(les.question)}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}</style></head>
<body>
<h1>Lesson {les.number}: {e(les.question)}</h1>
<p>Sweep <code>{e(runs.sweep)}</code> in MLflow experiment <a href="{e(link)}">{e(les.experiment)}</a>.
{"Equal compute across variants." if les.equal_compute else "Compute grows with the variant (the lesson is about it)."}
Held fixed: {e(fixed)}.</p>
<h2>Variants x metrics (mean over seeds)</h2>
<table><tr>{head}</tr>{body}</table>
<h2>Training loss vs tokens</h2>
{img}
<h2>Verdict</h2>
<ul>{verdicts}</ul>
<p><b>Paper:</b> {e(les.finding)}</p>
</body></html>
"""


def write_report(lesson: int | Lesson, tracking_uri: str, out: str | Path | None = None,
                 sweep: str | None = None) -> tuple[Path, LessonRuns]:
    runs = collect(lesson, tracking_uri, sweep)
    out = Path(out or f"dashboards/lesson-{runs.lesson.number}.html")
    out.parent.mkdir(parents=True, exist_ok=True)
    png = plot_curves(runs, out.with_suffix(".png"))
    out.write_text(render_html(runs, tracking_uri, png.name if png else None))
    return out, runs


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="HTML comparison of a lesson's sweep, read from MLflow")
    p.add_argument("--lesson", type=int, required=True)
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or http://127.0.0.1:5000")
    p.add_argument("--sweep", default=None, help="sweep name (default: the latest sweep of the lesson)")
    p.add_argument("--out", default=None, help="default: dashboards/lesson-N.html")
    p.set_defaults(func=_main)


def _main(args) -> int:
    import os
    import sys

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    try:
        out, runs = write_report(args.lesson, uri, args.out, args.sweep)
    except LookupError as err:
        print(f"cglab report: {err}", file=sys.stderr)
        return 1
    print(text_table(runs))
    print("\n".join(verdict_lines(runs)))
    print(f"wrote {out}")
    return 0
