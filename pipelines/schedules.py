"""Schedules: refresh every configured partition of the recipe daily, clean the cache weekly.

Both are created STOPPED: they show up under Automation in the Dagster UI (`make ui`), where a
toggle starts them; a running `dagster dev` (or `dagster-daemon`) then evaluates them.
"""

from datetime import datetime, timezone

import dagster as dg

from assets.partitions import arch_cut

RECIPE_JOB = "recipe"  # pipelines.definitions.recipe_job; by name so definitions can import this module
DAILY_CRON = "0 2 * * *"
WEEKLY_CRON = "0 3 * * 0"


@dg.schedule(cron_schedule=DAILY_CRON, job_name=RECIPE_JOB, execution_timezone="UTC",
             default_status=dg.DefaultScheduleStatus.STOPPED,
             description="Every day at 02:00 UTC: one recipe run per configured arch|cut partition. "
                         "Unchanged images and settings reuse the activation cache, so a quiet day is cheap.")
def daily_recipe_refresh(context: dg.ScheduleEvaluationContext):
    try:
        when = context.scheduled_execution_time
    except Exception:  # a context built without a time (a test, a manual evaluation) raises instead of None
        when = None
    day = (when or datetime.now(timezone.utc)).strftime("%Y-%m-%d")
    for partition in arch_cut.get_partition_keys():
        yield dg.RunRequest(run_key=f"{day}:{partition}", partition_key=partition,
                            tags={"precompute/trigger": "daily_recipe_refresh"})


weekly_cache_housekeeping = dg.ScheduleDefinition(
    name="weekly_cache_housekeeping", cron_schedule=WEEKLY_CRON, job_name="cache_housekeeping",
    execution_timezone="UTC", default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Sundays at 03:00 UTC: remove activation cache entries no partition uses and nobody read for 30 days.")

SCHEDULES = [daily_recipe_refresh, weekly_cache_housekeeping]
