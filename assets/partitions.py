"""arch x cut partitions, from configuration: adding an arch or a cut is a config edit, not a code edit.

Where they come from, the later one winning per key:
1. the defaults: `tf_efficientnet_lite0` and `resnet34`, cuts 0 and 1;
2. the project config file, `precompute.yaml` in the project root or the file named by
   $PRECOMPUTE_CONFIG, keys `archs: [...]` and `cuts: [...]` (other keys are left to others);
3. the environment, comma-separated: $PRECOMPUTE_ARCHS / $PRECOMPUTE_CUTS.

The cut is relative to the arch's table cut: 0 = fastai's cut, 1 = one child earlier (xtra_cut).
Every arch x cut pair is a partition, so each cut must lie in 0..max_xtra_cut of every configured
arch. An unknown arch or a cut out of range fails when the definitions load, with a message naming
the bad value, where it came from and the valid values.
"""

import os
from pathlib import Path
from typing import Mapping, Optional

import dagster as dg
import yaml

from precompute.archs import ARCHS as KNOWN_ARCHS
from precompute.archs import DEFAULT_ARCH, max_xtra_cut

CONFIG_FILE = Path(__file__).resolve().parents[1] / "precompute.yaml"
DEFAULTS = {"archs": [DEFAULT_ARCH, "resnet34"], "cuts": [0, 1]}
ENV_VARS = {"archs": "PRECOMPUTE_ARCHS", "cuts": "PRECOMPUTE_CUTS"}


class PartitionConfigError(ValueError):
    """The configured partitions are not valid; the message says which value and what is valid."""


def config_file(environ: Optional[Mapping[str, str]] = None) -> Optional[Path]:
    """The config file in use: $PRECOMPUTE_CONFIG (must exist), else `precompute.yaml` if present."""
    env = os.environ if environ is None else environ
    if env.get("PRECOMPUTE_CONFIG", "").strip():
        path = Path(env["PRECOMPUTE_CONFIG"].strip()).expanduser()
        if not path.is_file():
            raise PartitionConfigError(f"PRECOMPUTE_CONFIG={env['PRECOMPUTE_CONFIG']} is not a file: "
                                       "point it at a YAML file with `archs: [...]` and `cuts: [...]`, or unset it")
        return path
    return CONFIG_FILE if CONFIG_FILE.is_file() else None


def partition_config(environ: Optional[Mapping[str, str]] = None) -> tuple[list[str], list[str]]:
    """(archs, cuts) from defaults < config file < environment, validated against the cut table."""
    env = os.environ if environ is None else environ
    values, origin = dict(DEFAULTS), {key: "the defaults" for key in DEFAULTS}
    path = config_file(env)
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise PartitionConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise PartitionConfigError(f"{path} must be a mapping with keys `archs: [...]` and `cuts: [...]`")
        for key in DEFAULTS:
            if key in data:
                values[key], origin[key] = data[key], str(path)
    for key, var in ENV_VARS.items():
        if env.get(var, "").strip():
            values[key], origin[key] = env[var], f"${var}"

    archs = _as_list(values["archs"], "archs", origin["archs"])
    for arch in archs:
        if arch not in KNOWN_ARCHS:
            raise PartitionConfigError(f"unknown arch {arch!r} in archs (from {origin['archs']}); "
                                       f"valid archs: {', '.join(sorted(KNOWN_ARCHS))}")
    deepest = {arch: max_xtra_cut(KNOWN_ARCHS[arch]) for arch in archs}
    shared = min(deepest.values())
    cuts = []
    for raw in _as_list(values["cuts"], "cuts", origin["cuts"]):
        cut = _as_cut(raw, origin["cuts"], shared)
        for arch, top in deepest.items():
            if not 0 <= cut <= top:
                raise PartitionConfigError(
                    f"cut {raw!r} (from {origin['cuts']}) is out of range for arch {arch}: valid cuts are 0..{top} "
                    f"for it, and 0..{shared} for all configured archs ({', '.join(archs)})")
        cuts.append(str(cut))
    return archs, list(dict.fromkeys(cuts))


def _as_list(value, key: str, origin: str) -> list[str]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise PartitionConfigError(f"{key} (from {origin}) must be a list or a comma-separated string, "
                                   f"not {value!r}")
    out = list(dict.fromkeys(str(v).strip() for v in items if str(v).strip()))
    if not out:
        raise PartitionConfigError(f"{key} (from {origin}) is empty: name at least one")
    return out


def _as_cut(raw: str, origin: str, shared: int) -> int:
    try:
        return int(raw)
    except ValueError:
        raise PartitionConfigError(f"cut {raw!r} (from {origin}) is not an integer; "
                                   f"valid cuts for the configured archs are 0..{shared}") from None


ARCHS, CUTS = partition_config()

arch_cut = dg.MultiPartitionsDefinition({
    "arch": dg.StaticPartitionsDefinition(ARCHS),
    "cut": dg.StaticPartitionsDefinition(CUTS),
})
DEFAULT_PARTITION = f"{ARCHS[0]}|{CUTS[0]}"


def arch_and_cut(context: dg.AssetExecutionContext | dg.OpExecutionContext) -> tuple[str, int]:
    # op jobs launched with a "arch|cut" partition tag see a plain string
    keys = arch_cut.get_partition_key_from_str(str(context.partition_key)).keys_by_dimension
    return keys["arch"], int(keys["cut"])
