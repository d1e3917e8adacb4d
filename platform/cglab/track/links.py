"""Links into the MLflow UI that land where the reader needs to be: the runs table, one run, or a view of runs.

MLflow 3.17's UI picks between its GenAI pages and its model-training pages by a *workflow type*: the URL's
`workflowType` parameter, else the one last chosen in that browser, else `genai`. It does not read the
experiment's `mlflow.experimentKind` tag for that, so in a fresh browser `#/experiments/<id>` opens the GenAI
"Overview" of traces (empty for a lesson) even on an experiment tagged as model development. Every link here
names its page's route and carries `workflowType=machine_learning` (the model-training side bar)."""

from __future__ import annotations

import urllib.parse
from typing import Sequence

from cglab.track.mlflow_logger import TAG_ROLE, TAG_SWEEP

WORKFLOW = ("workflowType", "machine_learning")


def ui_url(ui: str, route: str, query: Sequence[tuple[str, str]] = ()) -> str:
    """`ui` (the server's base URL) at the hash route `route`, with the query's parameters and the workflow type."""
    q = urllib.parse.urlencode([*query, WORKFLOW], safe="/", quote_via=urllib.parse.quote)
    return f"{ui.rstrip('/')}/#/{route.strip('/')}?{q}"


def runs_url(ui: str, experiment_id: str, sweep: str, order: tuple[str, bool] | None = None) -> str:
    """The experiment's runs table, showing the sweep's trial runs only, one row each, sorted by the metric
    `order` = (key, ascending), else by name. The table nests child runs under their parent's row, collapsed,
    whenever it is sorted by time (its default), so a sweep's trials would hide behind one row."""
    key, asc = (f"metrics.`{order[0]}`", order[1]) if order else ("attributes.run_name", True)
    return ui_url(
        ui,
        f"experiments/{experiment_id}/runs",
        [
            ("searchFilter", f"tags.`{TAG_SWEEP}` = '{sweep}' and tags.`{TAG_ROLE}` = 'trial'"),
            ("orderByKey", key),
            ("orderByAsc", str(asc).lower()),
        ],
    )


def run_url(ui: str, experiment_id: str, run_id: str) -> str:
    """One run's page: its metrics, tags (a sweep's verdicts) and, for a sweep, its child runs by name."""
    return ui_url(ui, f"experiments/{experiment_id}/runs/{run_id}")
