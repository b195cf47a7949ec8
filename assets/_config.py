"""The base of the run configs whose fields are a ``precompute.settings`` model.

A config class subclasses this and the model (``class EvaluationConfig(SettingsConfig,
EvaluationSettings)``; the model first where it overrides another's defaults): the fields, choices
and rules are the model's, so the launchpad shows each ``Literal`` choice as an enum that Dagster
checks when the run is launched, and the bounds and the rules between fields (precompute x
augmentation, rates per layer group) are checked when the step builds its config, before the
asset's body runs. The run config stays flat: the same keys as ever.
"""

from typing import Mapping

import dagster as dg
from pydantic import ValidationError

from precompute.errors import ConfigError
from precompute.settings import config_error, problems


class ConfigRejected(ConfigError, dg.Failure):
    """A ConfigError to the library, and to Dagster a Failure that is not retried (it cannot pass)."""

    def __init__(self, message: str):
        dg.Failure.__init__(self, description=message, allow_retries=False)


class SettingsConfig(dg.Config):
    """A bad value is refused with a message that names each setting and what to give instead, all at once."""

    def __init__(self, **values):
        try:
            super().__init__(**values)
        except ValidationError as exc:
            error = config_error(problems(exc))
            raise ConfigRejected(str(error)) from None


def check_op_configs(run_config: Mapping, config_classes: Mapping[str, type]) -> None:
    """Build each op's config class from a run config, as its step will: every bound or rule a value
    breaks, for every op at once, before a run is launched (a ConfigError naming the op)."""
    found: list[str] = []
    for op, body in ((run_config or {}).get("ops") or {}).items():
        config_class = config_classes.get(op)
        if config_class is None or not isinstance(body, Mapping):
            continue
        try:
            config_class(**(body.get("config") or {}))
        except ConfigError as e:
            found += [f"{op}: {p}" for p in getattr(e, "problems", [str(e)])]
    if found:
        raise config_error(found)
