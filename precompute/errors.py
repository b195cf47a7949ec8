"""The library's error for a configuration that cannot work; raised before any work starts.

It lives at the bottom layer, with no torch import, so that the Dagster definitions and every
library layer can name it without loading the ML stack (issue 20: the definitions load light).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot work; raised before any work starts."""
