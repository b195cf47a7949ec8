"""One-time migration of stored materializations to the typed records.

Dagster's default IO manager pickles what each asset returns into files under
``$DAGSTER_HOME/storage``. Versions before the typed records stored the activations result and the
stage records as plain dicts; this version refuses a dict (``records.require_typed``) instead of
guessing. ``migrate_materializations`` rewrites every such pickle once, in place and atomically:

- a dict with ``store``, ``entry``, ``key`` and ``view_key`` becomes an ``ActivationsRef``;
- a dict with ``arch``, ``classes``, ``head_config`` and ``state_dict`` becomes a ``StageRecord``
  (its head name checked before anything is imported, as a model file's is);
- a pickled ``ActivationsRef`` or ``StageRecord`` of an earlier layout (the key a dict, the head a
  ``head_config`` dict) is loaded (``__setstate__`` migrates it) and written back in this layout.

Anything else is left as it is. Only files that start as a pickle does (protocol 2 or later) and
have no suffix (the IO manager's files; compute logs have one) are opened, and they are read by an
unpickler that builds only plain data, tensors (their bytes read with ``torch.load(weights_only=True)``)
and the record classes: a file that names anything else is not one of ours and is skipped, so
nothing executable comes from the storage folder.

Run it once after upgrading: ``python -m precompute.migrate $DAGSTER_HOME/storage`` (``--dry-run``
lists what would change).
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import pickle
import sys
from pathlib import Path

from precompute.records import REQUIRED_KEYS, ActivationsRef, StageRecord, checked_record

REF_KEYS = ("store", "entry", "key", "view_key")
# what a stored record or ref is built from, and nothing else
BUILTINS = {t.__name__: t for t in (dict, list, tuple, set, frozenset, bytearray, complex)}
DATA_CLASSES = {("collections", "OrderedDict"), ("numpy", "dtype"), ("numpy._core.multiarray", "scalar"),
                ("numpy.core.multiarray", "scalar"), ("torch._utils", "_rebuild_tensor_v2"),
                ("torch._utils", "_rebuild_parameter"), ("torch._tensor", "_rebuild_from_type_v2"),
                ("torch", "Tensor"), ("torch.nn.parameter", "Parameter")}
RECORD_CLASSES = {("precompute.records", "ActivationsRef"), ("precompute.records", "StageRecord"),
                  ("precompute.store.key", "CacheKey"), ("precompute.transform_spec", "TransformSpec"),
                  ("precompute.transforms", "TransformSpec"), ("precompute.heads", "HeadConfig"),
                  ("precompute.task", "SingleLabel"), ("precompute.task", "MultiLabel"),
                  ("precompute.train", "Schedule"), ("precompute.train", "FitOptions")}


class _RecordUnpickler(pickle.Unpickler):
    """Builds plain data, tensors and the record classes; refuses every other global."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch.storage", "_load_from_bytes"):  # a tensor's bytes: weights only
            import torch

            return lambda b: torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)
        if module == "builtins" and name in BUILTINS:
            return BUILTINS[name]
        if (module, name) in DATA_CLASSES or (module, name) in RECORD_CLASSES:
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a stored record")


def _typed(value, raw: bytes):
    """(the typed value, what it was) for a value an earlier version stored; (None, "") otherwise.
    A typed pickle of the earlier layout names what this layout does not: the ``head_config``
    attribute, or no ``CacheKey`` (the key was a dict); loading it migrated it already."""
    if isinstance(value, dict) and set(REF_KEYS) <= value.keys():
        return ActivationsRef.from_dict(value), "ActivationsRef (was a dict)"
    if isinstance(value, dict) and set(REQUIRED_KEYS) <= value.keys():
        return checked_record(value, "a stored materialization"), "StageRecord (was a dict)"
    if isinstance(value, ActivationsRef) and b"CacheKey" not in raw:
        return value, "ActivationsRef (was the layout with a dict key)"
    if isinstance(value, StageRecord) and b"head_config" in raw:
        return value, "StageRecord (was the layout with head_config)"
    return None, ""


def _pickle_files(storage: Path):
    for path in sorted(storage.rglob("*")):
        if path.is_file() and not path.suffix and not path.name.startswith("."):
            with open(path, "rb") as f:
                if f.read(1) == b"\x80":
                    yield path


def migrate_materializations(storage: str | os.PathLike, dry_run: bool = False) -> list[tuple[str, str]]:
    """Rewrite the earlier versions' stored activations results and stage records under ``storage``
    (Dagster's IO manager folder) as typed records. Returns (path, what it became) per file
    rewritten (with ``dry_run``: per file that would be)."""
    storage = Path(storage)
    if not storage.is_dir():
        raise FileNotFoundError(f"{storage} is not a folder: pass Dagster's storage folder, e.g. $DAGSTER_HOME/storage")
    changed = []
    for path in _pickle_files(storage):
        raw = path.read_bytes()
        try:
            value = _RecordUnpickler(io.BytesIO(raw)).load()
        except Exception:  # noqa: BLE001 - not a pickle of plain data and records: not ours to migrate
            continue
        typed, what = _typed(value, raw)
        if typed is None:
            continue
        changed.append((str(path), what))
        if not dry_run:
            tmp = path.with_name(f".{path.name}.migrating")
            tmp.write_bytes(pickle.dumps(typed))
            os.replace(tmp, path)  # a reader sees the old file or the new one, never half of one
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m precompute.migrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("storage", help="Dagster's IO manager folder, e.g. $DAGSTER_HOME/storage")
    parser.add_argument("--dry-run", action="store_true", help="list what would be rewritten, change nothing")
    args = parser.parse_args(argv)
    changed = migrate_materializations(args.storage, args.dry_run)
    for path, what in changed:
        print(f"{'would rewrite' if args.dry_run else 'rewrote'} {path}: {what}")
    print(f"{len(changed)} materialization(s) {'to migrate' if args.dry_run else 'migrated'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
