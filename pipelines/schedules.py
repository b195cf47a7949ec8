"""Schedules: refresh every configured partition of the recipe daily, clean the cache weekly.

Both are created STOPPED: they show up under Automation in the Dagster UI (`make ui`), where a
toggle starts them; a running `dagster dev` (or `dagster-daemon`) then evaluates them.

Every run request carries the partition's run config from `precompute.yaml` (`run_config`,
`partition_run_config`; see assets/partitions.py), and a partition whose pretrained weights are not
on this machine (nor downloadable under the current settings) is not launched: its run could only
fail. The tick logs which partitions it skipped and why.
"""

from datetime import datetime, timezone

import dagster as dg

from assets.partitions import arch_cut, run_config_for

RECIPE_JOB = "recipe"  # pipelines.definitions.recipe_job; by name so definitions can import this module
DAILY_CRON = "0 2 * * *"
WEEKLY_CRON = "0 3 * * 0"


def runnable_partitions(log=None) -> tuple[list[str], dict[str, str]]:
    """(configured partitions whose weights are available, {skipped partition: why}). Downloads nothing."""
    from precompute.weights import weights_unavailable_reason  # torch: only when a tick runs (issue 20)

    runnable, skipped = [], {}
    for partition in arch_cut.get_partition_keys():
        arch = partition.split("|")[0]
        cfg = run_config_for(partition).get("ops", {}).get("activations", {}).get("config", {}) or {}
        why = weights_unavailable_reason(arch, cfg.get("weights", "pretrained"), cfg.get("weights_path"))
        if why is None:
            runnable.append(partition)
        else:
            skipped[partition] = why
    if skipped and log is not None:
        log.warning(f"not launching {len(skipped)} partition(s) whose weights are not available: "
                    + "; ".join(f"{p}: {why}" for p, why in skipped.items()))
    return runnable, skipped


def recipe_requests(run_key_prefix: str, tags: dict, log=None) -> list[dg.RunRequest]:
    """One run request per runnable partition, each with its configured run config."""
    return [dg.RunRequest(run_key=f"{run_key_prefix}:{partition}", partition_key=partition,
                          run_config=run_config_for(partition), tags=tags)
            for partition in runnable_partitions(log)[0]]


@dg.schedule(cron_schedule=DAILY_CRON, job_name=RECIPE_JOB, execution_timezone="UTC",
             default_status=dg.DefaultScheduleStatus.STOPPED,
             description="Every day at 02:00 UTC: one recipe run per configured arch|cut partition whose weights "
                         "are available, with the run config from precompute.yaml. "
                         "Unchanged images and settings reuse the activation cache, so a quiet day is cheap.")
def daily_recipe_refresh(context: dg.ScheduleEvaluationContext):
    try:
        when = context.scheduled_execution_time
    except Exception:  # a context built without a time (a test, a manual evaluation) raises instead of None
        when = None
    day = (when or datetime.now(timezone.utc)).strftime("%Y-%m-%d")
    requests = recipe_requests(day, {"precompute/trigger": "daily_recipe_refresh"}, context.log)
    if not requests:
        return dg.SkipReason("no configured partition has its weights available here: "
                             + "; ".join(f"{p}: {why}" for p, why in runnable_partitions()[1].items()))
    return requests


weekly_cache_housekeeping = dg.ScheduleDefinition(
    name="weekly_cache_housekeeping", cron_schedule=WEEKLY_CRON, job_name="cache_housekeeping",
    execution_timezone="UTC", default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Sundays at 03:00 UTC: remove activation cache entries no partition uses and nobody read for 30 days.")

SCHEDULES = [daily_recipe_refresh, weekly_cache_housekeeping]
