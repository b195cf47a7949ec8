"""arch x cut partitions, from configuration: adding an arch or a cut is a config edit, not a code edit.

Where they come from, the later one winning per key:
1. the defaults: `tf_efficientnet_lite0` and `resnet34`, cuts 0 and 1;
2. the project config file, `precompute.yaml` in the project root or the file named by
   $PRECOMPUTE_CONFIG, keys `archs: [...]` and `cuts: [...]` (other keys are left to others);
3. the environment, comma-separated: $PRECOMPUTE_ARCHS / $PRECOMPUTE_CUTS.

The same file holds the recipe's run config, the one the daily schedule, the new-images sensor and
`make demo` launch with (nothing in it: the config defaults):

    run_config:              # a Dagster run config, for every partition
      ops:
        activations: {config: {size: 128}}
        head_on_cache: {config: {epochs: 3}}
    partition_run_config:    # optional, per "arch|cut" or per arch, merged over run_config
      resnet34:
        ops: {activations: {config: {weights_path: /models/resnet34.pth}}}

It is checked when the definitions load: here its shape, in pipelines/definitions.py every
partition's config against the recipe job's config schema.

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
        data = _load_file(path)
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


RUN_CONFIG_KEYS = ("ops", "resources", "execution", "loggers")


def _load_file(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise PartitionConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise PartitionConfigError(f"{path} must be a mapping with keys `archs: [...]` and `cuts: [...]`")
    return data


def _check_run_config(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PartitionConfigError(f"{where} must be a Dagster run config mapping such as "
                                   f"{{ops: {{activations: {{config: {{size: 128}}}}}}}}, not {value!r}")
    bad = [k for k in value if k not in RUN_CONFIG_KEYS]
    if bad:
        raise PartitionConfigError(f"{where} has unknown top-level key(s) {', '.join(map(repr, bad))}; a run config "
                                   f"holds {', '.join(RUN_CONFIG_KEYS)} (op settings go under ops: <op>: config:)")
    for key, sub in value.items():
        if sub is not None and not isinstance(sub, dict):
            raise PartitionConfigError(f"{where}.{key} must be a mapping, not {sub!r}")
    return value


def merge_config(base: dict, over: dict) -> dict:
    """``base`` with ``over`` merged in, mapping by mapping; ``over`` wins on a conflict."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge_config(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def run_configs(environ: Optional[Mapping[str, str]] = None, archs: Optional[list[str]] = None,
                cuts: Optional[list[str]] = None) -> dict[str, dict]:
    """{partition key: run config} from the config file's `run_config` and `partition_run_config`.

    Without a config file (or without those keys) every partition gets ``{}``: the config defaults.
    """
    env = os.environ if environ is None else environ
    if archs is None or cuts is None:
        archs, cuts = partition_config(env)
    keys = [f"{a}|{c}" for a in archs for c in cuts]
    path = config_file(env)
    data = _load_file(path) if path is not None else {}
    common = _check_run_config(data.get("run_config"), f"run_config in {path}")
    per = data.get("partition_run_config") or {}
    if not isinstance(per, dict):
        raise PartitionConfigError(f"partition_run_config in {path} must map an \"arch|cut\" key or an arch "
                                   f"to a run config, not {per!r}")
    for name, value in per.items():
        if name not in keys and name not in archs:
            raise PartitionConfigError(f"partition_run_config in {path} names {name!r}, which is neither a configured "
                                       f"partition ({', '.join(keys)}) nor a configured arch ({', '.join(archs)})")
        _check_run_config(value, f"partition_run_config[{name!r}] in {path}")
    out = {}
    for key in keys:
        arch = key.split("|")[0]
        cfg = merge_config(common, per.get(arch) or {})
        out[key] = merge_config(cfg, per.get(key) or {})
    return out


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
RUN_CONFIGS = run_configs(archs=ARCHS, cuts=CUTS)


def run_config_for(partition: str) -> dict:
    """The configured run config of a partition (``{}``: the defaults); a copy, safe to change."""
    import copy
    return copy.deepcopy(RUN_CONFIGS.get(str(partition), {}))


def arch_and_cut(context: dg.AssetExecutionContext | dg.OpExecutionContext) -> tuple[str, int]:
    # op jobs launched with a "arch|cut" partition tag see a plain string
    keys = arch_cut.get_partition_key_from_str(str(context.partition_key)).keys_by_dimension
    return keys["arch"], int(keys["cut"])
