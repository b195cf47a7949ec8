"""What every training stage shares: what a tracked run and the orchestrator get to see of a stage record."""

from __future__ import annotations

import logging
import re
from typing import Callable, ContextManager

from precompute.records import StageRecord
from precompute.train import Schedule

# Each stage takes its typed settings, the upstream results and ``open_run`` (params -> an open
# tracking run, precompute.tracking's run logger): the orchestrator decides where runs go, the stages
# decide what is trained, logged and handed on. ``log`` takes .info/.warning (a logger, Dagster's too).
LOG = logging.getLogger(__name__)
OpenRun = Callable[[dict], ContextManager]


def log_stage(run, record: StageRecord) -> StageRecord:
    """Inside the stage's run: its layer groups, its run id on the record, and for a multi-label
    record each label's threshold (as predict will use it)."""
    run.layer_groups(record.groups)
    record.mlflow_run_id = run.run_id
    if record.thresholds is not None:
        run.metrics({"threshold." + re.sub(r"[^\w\-. /]", "_", c): t for c, t in zip(record.classes, record.thresholds)})
    return record


def stage_metadata(record: StageRecord, thresholds: bool = True) -> dict:
    """What the orchestrator shows of a trained stage: its run, last epoch and layer groups."""
    last = record.last_epoch
    out = {"mlflow_run_id": record.mlflow_run_id, "valid_accuracy": float(last.get("valid_accuracy", float("nan"))),
           "valid_loss": float(last.get("valid_loss", float("nan"))), "layer_groups": record.groups}
    if thresholds and record.thresholds is not None:
        out["thresholds"] = dict(zip(record.classes, record.thresholds))
    return out


def schedule_params(schedule: Schedule) -> dict:
    """The schedule's warm-up as it runs (not in the stage configs): sgdr's share of the first cycle
    at lr/100, one_cycle's share of the steps rising to the peak."""
    return {"warmup": schedule.warmup if schedule.kind == "sgdr" else 0.0,
            "pct_start": schedule.pct_start if schedule.kind == "one_cycle" else 0.0}
