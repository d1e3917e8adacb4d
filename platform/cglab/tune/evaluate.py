"""The last step of every trial: evaluate the trained checkpoint and return the metrics the lessons decide on.

The evaluation itself lives in the eval layer (`cglab.eval.checkpoint_eval`, whose docstring lists the metric
keys and tags), shared with the periodic evaluation while training (`cglab.eval.periodic`); this module is the
sweep's name for it.
"""

from __future__ import annotations

from cglab.eval.checkpoint_eval import (  # noqa: F401  (the sweep's and its tests' names)
    CheckpointEval,
    evaluate_checkpoint,
    sandbox_conditions,
    text_sources,
    text_tags,
)
