"""The embedded Dagster instance: its home (telemetry off) and the quiet console. A recipe launched
again from what an MLflow run logged is ``pipelines.rerun``."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from resources import project_home

# The Dagster APIs this project uses knowingly although Dagster marks them beta: an asset's data
# version (``Output(data_version=...)``, ``DataVersion``: how the manifest and the activations say
# what they contain, and how a head result is reused). Their warnings say nothing a user can act on.
KNOWN_BETA_APIS = (r"Parameter `data_version` of initializer `Output\.__init__`",
                   r"Class `DataVersion`")
# The run's console shows INFO and up: progress and results, not every Dagster event.
QUIET_LOGGING = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
TELEMETRY_OFF = "telemetry:\n  enabled: false\n"


def quiet_warnings() -> None:
    """Hide the beta warnings of KNOWN_BETA_APIS only; every other warning still shows."""
    from dagster import BetaWarning

    for message in KNOWN_BETA_APIS:
        warnings.filterwarnings("ignore", message=message, category=BetaWarning)


def dagster_home() -> Path:
    """$DAGSTER_HOME, default $PRECOMPUTE_HOME/dagster_home, created with a dagster.yaml that turns
    telemetry off (an existing dagster.yaml gets that setting added unless it has its own)."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(project_home() / "dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    text = config.read_text() if config.exists() else ""
    if "telemetry" not in text:
        config.write_text(text + ("\n" if text and not text.endswith("\n") else "") + TELEMETRY_OFF)
    return home


def with_quiet_logging(run_config: dict) -> dict:
    """``run_config`` with the console at INFO, unless it configures the console logger itself."""
    return run_config if "loggers" in run_config else {**run_config, **QUIET_LOGGING}
