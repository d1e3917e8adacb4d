"""`cglab report --lesson N`: read a lesson's sweep back from MLflow and write one HTML page: the
variants x metrics table (mean and 95% interval over seeds), the deciding metrics with error bars, loss-vs-tokens
curves, the held-out metrics' curves over tokens (mean and band over seeds) with the decision stability per
metric (from which point on the ranking and verdicts held; whether a run 4x shorter agreed), the verdict of
each contrast the lesson declared (effect with its interval, margin, test, raw and Holm-adjusted p), and links
into the MLflow UI. The stability and the curve plots are also recorded on the sweep's parent run (tags
`stability/<metric>/...`, artifacts under `report/`).

Where the runs are: `--tracking-uri`, else $MLFLOW_TRACKING_URI, else the local store `cglab ablate` writes when
it is given no URI (`.cglab/mlflow/mlflow.db`, read directly: no server needs to run). A server that does not
answer its /health within seconds is an error naming it, before any MLflow client call (whose retries would
otherwise wait for minutes)."""

from __future__ import annotations

import html
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from cglab.track.links import run_url, runs_url, ui_url
from cglab.track.server import TrackingUnavailable, check_server, sqlite_uri
from cglab.tune.curves import QUARTER, Stability, align
from cglab.tune.lessons import Lesson
from cglab.tune.results import LessonRuns, collect, record_stability
from cglab.tune.stats import Interval
from cglab.tune.verdicts import ALPHA, LEVEL, NOT_MEASURED, ContrastOutcome

DEFAULT_UI = "http://127.0.0.1:5000"  # where `cglab mlflow up` serves a local store's UI


def resolve_tracking(uri: str | None, root: str | Path = ".cglab/mlflow") -> tuple[str, str]:
    """(tracking URI to read, MLflow UI base for links). No URI: the SQLite store `cglab ablate` wrote under
    root when it had none (read in place; its UI is what `cglab mlflow up --root ROOT` serves)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        check_server(uri)
        return uri, uri.rstrip("/") if uri.startswith(("http://", "https://")) else DEFAULT_UI
    db = Path(root) / "mlflow.db"
    if not db.is_file():
        raise TrackingUnavailable(
            f"no tracking URI given ($MLFLOW_TRACKING_URI is unset) and no local store at {db}: run "
            f"`cglab ablate N` here first (it writes there), or pass --tracking-uri"
        )
    return sqlite_uri(db), DEFAULT_UI


def _json(x) -> str:
    return json.dumps(x, separators=(",", ":"))


def compare_url(runs: LessonRuns, ui: str) -> str:
    """MLflow's compare view of the sweep's finished child runs. Its route (`#/compare-runs?runs=[..]&
    experiments=[..]`, MLflow 3.17's getCompareRunPageRoute) takes no metric selection: pick the deciding
    metrics there by hand, or use `metric_url`."""
    return ui_url(ui, "compare-runs", [("runs", _json(runs.run_ids)), ("experiments", _json([runs.experiment_id]))])


def _deciding(runs: LessonRuns) -> list:
    """The lesson's metrics that its runs logged, in the lesson's order (the deciding ones)."""
    return [m for m in runs.lesson.metrics if any(m.key in x for x in runs.metrics.values())]


def metric_url(runs: LessonRuns, ui: str) -> str | None:
    """MLflow's metric view of the child runs with the lesson's deciding metrics selected (MLflow 3.17's
    getMetricPageRoute: `plot_metric_keys` is the one URL parameter that selects metrics)."""
    keys = [m.key for m in _deciding(runs)]
    if not keys or not runs.run_ids:
        return None
    return ui_url(
        ui,
        "metric/",
        [
            ("runs", _json(runs.run_ids)),
            ("metric", _json(keys[0])),
            ("experiments", _json([runs.experiment_id])),
            ("plot_metric_keys", _json(keys)),
        ],
    )


def mlflow_links(runs: LessonRuns, ui: str) -> list[tuple[str, str]]:
    """(what, URL) of the MLflow pages a reader of the sweep opens, first to last: its trial runs in the runs
    table (best first on the first deciding metric), the sweep's run (verdicts as tags, trials listed), the
    compare view and the metric view."""
    order = next(((m.key, m.goal == "min") for m in _deciding(runs)), None)
    links = [
        ("the sweep's runs", runs_url(ui, runs.experiment_id, runs.sweep, order)),
        ("the sweep's run (verdicts as tags)", run_url(ui, runs.experiment_id, runs.parent_run_id)),
        ("compare view", compare_url(runs, ui)),
    ]
    mview = metric_url(runs, ui)
    if mview:
        links.append(("deciding metrics (the compare view cannot preselect metrics by URL)", mview))
    return links


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4g}"


def _fmt_iv(iv: Interval | None) -> str:
    """'mean ± half' (95% t-interval over seeds); the bare mean with one seed, where there is no interval."""
    if iv is None:
        return "-"
    return _fmt(iv.mean) if iv.half is None else f"{_fmt(iv.mean)} ± {iv.half:.2g}"


def text_table(runs: LessonRuns) -> str:
    keys = runs.metric_keys
    rows = [["variant", "seeds", *keys]]
    for v in runs.metrics:
        rows.append([v, str(len(runs.seeds.get(v, []))), *(_fmt_iv(runs.interval(v, k)) for k in keys)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(
        "(mean ± half-width of the 95% t-interval over seeds; a bare mean: one seed; *_ppl: exp of the mean log)"
    )
    return "\n".join(lines)


def verdict_lines(runs: LessonRuns) -> list[str]:
    return [_verdict_line(o) for o in runs.outcomes()]


def _p(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _verdict_line(o: ContrastOutcome) -> str:
    """'<test> <a> vs <b> on <metric>: <verdict> (<note>): a <mean ± h> vs b <mean ± h>, a - b <d> [lo, hi]
    (90%, paired over n seeds), margin m, p raw (Holm adjusted)'."""
    c = o.contrast
    head = f"{c.test} {c.a} vs {c.b} on {c.metric}: {o.verdict}" + (f" ({o.note})" if o.note else "")
    if o.diff is None:
        return f"{head}; margin {c.margin:g}"
    sides = f"{c.a} {_fmt_iv(o.intervals[c.a])} vs {c.b} {_fmt_iv(o.intervals[c.b])}"
    iv = o.interval
    diff = f"a - b {iv.mean:+.4g}" + (
        f" [{iv.lo:+.4g}, {iv.hi:+.4g}] ({LEVEL:.0%}" + (f", paired over {iv.n} seeds)" if o.paired else ")")
        if iv.lo is not None
        else ""
    )
    return f"{head}: {sides}, {diff}, margin {c.margin:g}, p {_p(o.p)} (Holm {_p(o.p_holm)})"


def verdict_rows(runs: LessonRuns) -> list[list[str]]:
    """Per declared contrast: the pair, metric, test, margin, a - b with its 90% interval, raw and Holm p, verdict."""
    rows = []
    for o in runs.outcomes():
        c, iv = o.contrast, o.interval
        effect = "-" if iv is None else f"{iv.mean:+.4g}" + ("" if iv.lo is None else f" [{iv.lo:+.4g}, {iv.hi:+.4g}]")
        rows.append(
            [f"{c.a} vs {c.b}", c.metric, c.test, f"{c.margin:g}", effect, _p(o.p), _p(o.p_holm), o.verdict, o.note]
        )
    return rows


VERDICT_HEAD = ["contrast (a vs b)", "metric", "test", "margin", "a - b [90%]", "p", "p (Holm)", "verdict", "note"]


def _tokens(x: float) -> str:
    """4,096 / 917,504 / 1.23e+09: exact below a million, three digits above."""
    return f"{x:,.0f}" if x < 1e6 else f"{x:.3g}"


def _decided(outcomes, ranking) -> str:
    verdicts = "; ".join(f"{o.contrast.a} vs {o.contrast.b}: {o.verdict}" for o in outcomes)
    best = f"best {ranking[0]}" if ranking else ""
    return ", ".join(x for x in (verdicts, best) if x) or NOT_MEASURED


def stability_rows(stab: list[Stability]) -> list[list[str]]:
    """One row per lesson metric: final verdicts, stable from (tokens, fraction of the run), 4x-shorter answer."""
    rows = []
    for s in stab:
        if s.curves is None:
            measured = s.note != NOT_MEASURED
            rows.append([s.metric, "-" if measured else NOT_MEASURED, "-", "-", s.quarter, s.note if measured else ""])
            continue
        q = s.quarter_point
        at_q = f" ({_decided(s.outcomes[q], s.rankings[q])} at {s.curves.fraction[q]:.0%})" if q is not None else ""
        rows.append(
            [
                s.metric,
                _decided(s.final, s.rankings[-1]),
                _tokens(s.stable_from_tokens),
                f"{s.stable_from_fraction:.0%}",
                s.quarter + at_q,
                s.note,
            ]
        )
    return rows


STABILITY_HEAD = ["metric", "final verdicts", "stable from (tokens)", "of the run", "4x shorter run", "note"]


def stability_lines(stab: list[Stability]) -> list[str]:
    out = []
    for r in stability_rows(stab):
        if r[2] == "-":
            out.append(f"{r[0]}: {r[5] or r[4]}")
        else:
            tail = f" ({r[5]})" if r[5] else ""
            out.append(f"{r[0]}: ranking and verdicts stable from {r[2]} tokens ({r[3]} of the run); "
                       f"a run 4x shorter: {r[4]}{tail}")  # fmt: skip
    return out


def plot_eval_curves(runs: LessonRuns, out: Path, stab: list[Stability] | None = None) -> dict[str, Path]:
    """Per held-out metric with more than one evaluation: each variant's mean over seeds against tokens seen,
    its 95% band shaded (none with one seed), and where the lesson's ranking and verdict held from. One PNG per
    metric next to `out`: <stem>-curve-<metric>.png."""
    stable = {s.metric: s.stable_from_tokens for s in stab or () if s.stable_from is not None}
    keys = [m.key for m in runs.lesson.metrics if m.key in runs.histories]
    keys += [k for k in runs.histories if k not in keys]
    curves = [c for c in (align(k, runs.histories[k], list(runs.metrics)) for k in keys) if c and len(c.fraction) > 1]
    if not curves:
        return {}
    import matplotlib  # seconds to import: only when there is something to plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    for c in curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, v in enumerate(c.variants):
            # only the variant's own points: where it has none (lesson 5's variants evaluate on different budgets,
            # so the aligned points are the union of their schedules) a NaN would break its line into dots
            ok = ~np.isnan(c.mean[i])
            x = c.tokens[i][ok]
            (line,) = ax.plot(x, c.mean[i][ok], marker="o", ms=3, label=f"{v} ({int(c.n[i].max())} seeds)")
            ax.fill_between(x, c.lo[i][ok], c.hi[i][ok], color=line.get_color(), alpha=0.2, linewidth=0)
        quarter = QUARTER * float(c.tokens[:, -1].max())
        ax.axvline(quarter, color="grey", linestyle=":", linewidth=1, label="a quarter of the run")
        if c.metric in stable:
            ax.axvline(
                stable[c.metric], color="black", linestyle="--", linewidth=1, label="ranking and verdict stable from"
            )
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(c.metric)
        ax.set_title(f"Lesson {runs.lesson.number}: {c.metric} (mean and 95% band over seeds)", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out.with_name(f"{out.stem}-curve-{c.metric.replace('/', '_')}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths[c.metric] = path
    return paths


def plot_curves(runs: LessonRuns, path: Path) -> Path | None:
    if not any(runs.curves.values()):
        return None
    import matplotlib  # seconds to import: only when there is something to plot

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


def plot_metrics(runs: LessonRuns, path: Path) -> Path | None:
    """One panel per lesson metric: each variant's mean with its 95% interval as an error bar (none: one seed)."""
    keys = [m.key for m in runs.lesson.metrics if any(runs.interval(v, m.key) for v in runs.metrics)]
    if not keys:
        return None
    import matplotlib  # seconds to import: only when there is something to plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        names = [v for v in runs.metrics if runs.interval(v, key)]
        ivs = [runs.interval(v, key) for v in names]
        err = [0.0 if iv.half is None else iv.half for iv in ivs]
        ax.errorbar(range(len(names)), [iv.mean for iv in ivs], yerr=err, fmt="o", capsize=4)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Lesson {runs.lesson.number}: mean and 95% interval over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_html(
    runs: LessonRuns,
    ui: str,
    png_name: str | None,
    metrics_png: str | None = None,
    stab: list[Stability] | None = None,
    curve_pngs: dict[str, str] | None = None,
) -> str:
    les, e = runs.lesson, html.escape
    stab = runs.stability() if stab is None else stab
    shead = "".join(f"<th>{e(k)}</th>" for k in STABILITY_HEAD)
    sbody = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in stability_rows(stab))
    cimgs = "".join(f'<img src="{e(p)}" alt="{e(k)} vs tokens">' for k, p in (curve_pngs or {}).items()) or (
        "<p>No held-out metric was evaluated more than once per run (only the final evaluation): no curves.</p>"
    )
    keys = runs.metric_keys
    head = "".join(f"<th>{e(k)}</th>" for k in ["variant", "seeds", "status", *keys])
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{e(c)}</td>"
            for c in [
                v,
                str(len(runs.seeds.get(v, []))),
                ",".join(sorted(set(runs.status.get(v, [])))),
                *(_fmt_iv(runs.interval(v, k)) for k in keys),
            ]
        )
        + "</tr>"
        for v in runs.metrics
    )
    vhead = "".join(f"<th>{e(k)}</th>" for k in VERDICT_HEAD)
    vbody = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in verdict_rows(runs))
    claims = "".join(f"<li>{e(o.contrast.name)}: {e(o.contrast.claim)}</li>" for o in runs.outcomes())
    img = f'<img src="{e(png_name)}" alt="loss vs tokens">' if png_name else "<p>No loss curves logged.</p>"
    bars = (
        f'<img src="{e(metrics_png)}" alt="metrics with 95% intervals">'
        if metrics_png
        else "<p>No lesson metric measured.</p>"
    )
    links = "; ".join(f'<a href="{e(url)}">{e(what)}</a>' for what, url in mlflow_links(runs, ui))
    fixed = ", ".join(les.fixed)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>CodeGen2 lesson {les.number}: {e(les.question)}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}</style></head>
<body>
<h1>Lesson {les.number}: {e(les.question)}</h1>
<p>Sweep <code>{e(runs.sweep)}</code> in MLflow experiment <code>{e(les.experiment)}</code>: {links}.
{"Equal compute across variants." if les.equal_compute else "Compute grows with the variant (the lesson is about it)."}
Held fixed: {e(fixed)}.</p>
<h2>Variants x metrics (mean ± half-width of the 95% t-interval over seeds; perplexities: exp of the mean
log perplexity, a mean NLL)</h2>
<table><tr>{head}</tr>{body}</table>
{bars}
<h2>Training loss vs tokens</h2>
{img}
<h2>Held-out metrics vs tokens, and decision stability</h2>
{cimgs}
<p>Each held-out evaluation during training is on the same split as the final one. Per metric: the point
(tokens seen, and as a fraction of the run) from which the ranking of the variants and the verdict no longer
changed through the end, and whether a run 4x shorter would have reached the same verdict (the verdict, and the
variant it favours, at the last evaluation at or before a quarter of the run, against the final one; <i>not
measured</i> when there is no evaluation there). An early evaluation is not a shorter run (its learning rate has
not decayed): a lower bound on what a shorter run would say, not a substitute for it.</p>
<table><tr>{shead}</tr>{sbody}</table>
<h2>Verdicts on the declared contrasts</h2>
<p>The lesson declared these contrasts in code before any run (<code>cglab.tune.lessons</code>); nothing else is
decided. Per contrast, a - b is the mean over seeds of the paired difference (Welch where the variants share fewer
than two seeds), in the metric's units (bits per byte: lower is better), with its {LEVEL:.0%} interval, the one a
one-sided test at {ALPHA:g} reads. <i>superiority</i>: a better than b; <i>non_inferiority</i>: a worse by less
than the margin; <i>equivalence</i> (TOST): a and b within the margin either way. The p-values are Holm-adjusted
over the lesson's contrasts: <i>agrees</i> (<i>equivalent</i> for an equivalence) when the claim's adjusted p is
below {ALPHA:g}, <i>disagrees</i> when the contrary's is, <i>inconclusive</i> otherwise (a failed equivalence is
not a difference) or with one seed. Held equal across variants: {e(les.held_equal.replace("_", " "))}.</p>
<table><tr>{vhead}</tr>{vbody}</table>
<ul>{claims}</ul>
<p><b>Paper:</b> {e(les.finding)}</p>
</body></html>
"""


def write_report(
    lesson: int | Lesson,
    tracking_uri: str,
    out: str | Path | None = None,
    sweep: str | None = None,
    ui: str | None = None,
    record: bool = True,
) -> tuple[Path, LessonRuns]:
    runs = collect(lesson, tracking_uri, sweep)
    out = Path(out or f"dashboards/lesson-{runs.lesson.number}.html")
    out.parent.mkdir(parents=True, exist_ok=True)
    png = plot_curves(runs, out.with_suffix(".png"))
    bars = plot_metrics(runs, out.with_name(out.stem + "-metrics.png"))
    stab = runs.stability()
    curve_pngs = plot_eval_curves(runs, out, stab)
    ui = ui or (tracking_uri if tracking_uri.startswith(("http://", "https://")) else DEFAULT_UI)
    out.write_text(
        render_html(
            runs,
            ui.rstrip("/"),
            png.name if png else None,
            bars.name if bars else None,
            stab,
            {k: p.name for k, p in curve_pngs.items()},
        )
    )
    if record:
        _record(runs, tracking_uri, stab, list(curve_pngs.values()))
    return out, runs


def _record(runs: LessonRuns, tracking_uri: str, stab: list[Stability], plots: list[Path]) -> None:
    """The stability tags and the curve plots onto the sweep's parent run. Bookkeeping: a store that cannot
    take them (a SQLite store read without its server cannot upload to `mlflow-artifacts:`) costs a warning,
    not the report."""
    try:
        record_stability(runs, tracking_uri, stab)
        if plots:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri)
            for p in plots:
                client.log_artifact(runs.parent_run_id, str(p), "report")
    except Exception as err:  # any store failure: the HTML is written, say what was not recorded
        print(f"cglab report: could not record the stability on the parent run: {err}", file=sys.stderr)


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="HTML comparison of a lesson's sweep, read from MLflow")
    p.add_argument("--lesson", type=int, required=True)
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="default: $MLFLOW_TRACKING_URI, else the local store `cglab ablate` wrote (--mlflow-root)",
    )
    p.add_argument(
        "--mlflow-root",
        default=".cglab/mlflow",
        help="local store to read when no tracking URI is set (default .cglab/mlflow, as ablate)",
    )
    p.add_argument("--sweep", default=None, help="sweep name (default: the latest sweep of the lesson)")
    p.add_argument("--out", default=None, help="default: dashboards/lesson-N.html")
    p.set_defaults(func=_main)


def _main(args) -> int:
    try:
        uri, ui = resolve_tracking(args.tracking_uri, args.mlflow_root)
        out, runs = write_report(args.lesson, uri, args.out, args.sweep, ui)
    except LookupError as err:
        print(f"cglab report: {err}", file=sys.stderr)
        return 1
    print(text_table(runs))
    print("\n".join(verdict_lines(runs)))
    print("decision stability:")
    print("\n".join("  " + line for line in stability_lines(runs.stability())))
    print(f"wrote {out}")
    print("\n".join(link_lines(runs, ui, args.mlflow_root if uri.startswith("sqlite:") else None)))
    return 0


def link_lines(runs: LessonRuns, ui: str, root: str | Path | None = None) -> list[str]:
    """What `cglab report`, `cglab ablate` and `make demo` print after a sweep: the MLflow pages to open, after the
    command that serves a local store's UI (root: the store's directory; None: the server at `ui` is up)."""
    head = f"MLflow UI on these runs: `cglab mlflow up --root {root} --port 5000`, then" if root else "MLflow UI:"
    return [head, *(f"  {what}: {url}" for what, url in mlflow_links(runs, ui))]
