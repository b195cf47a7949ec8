"""The ``activations`` stage: every ok image's activations in the cache entry its key names, damaged
chunks dropped and recomputed, and the entry checked against the manifest."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from precompute.archs import get_arch
from precompute.backbone import Backbone, load_backbone, transform_for
from precompute.features import PrecomputeStats, check_decoder, compute_activations
from precompute.manifest import ok_rows
from precompute.records import ActivationsRef, require_typed
from precompute.store import ActivationStore, CacheCorruption, CacheKey, Entry, VerifyReport, view_key
from precompute.errors import ConfigError
from precompute.settings import ActivationSettings, StorageDtype, choices
from precompute.transforms import TransformSpec, eval_transform
from precompute.weights import ALLOW_DOWNLOAD_ENV, WeightsUnavailable, looks_like_torch_file, resolve_weights_file

LOG = logging.getLogger(__name__)


def activation_key(bb: Backbone, ts: TransformSpec, pooled: bool = True, dtype: str = "float32",
                   decoder: str = "pil") -> CacheKey:
    return CacheKey(arch=bb.spec.name, weights_id=bb.weights_id, xtra_cut=bb.xtra_cut,
                    cut_index=len(bb.body), transform=ts, pooled=pooled, dtype=dtype, decoder=decoder)


def precompute(manifest: pd.DataFrame, store: ActivationStore, bb: Backbone, ts: TransformSpec,
               pooled: bool = True, dtype: str = "float32", batch_size: int = 32, chunk_rows: int = 256,
               num_workers: int = 0, device="cpu", on_progress=None,
               shard: tuple[int, int] = (0, 1), decoder: str = "pil") -> tuple[Entry, PrecomputeStats, str]:
    """Fill the entry for every ok image (of one shard); returns (entry, stats, view key).
    ``decoder``: "pil" (CPU) or "nvjpeg" (JPEGs on the CUDA device; part of the entry's key)."""
    rows = ok_rows(manifest)
    entry = store.entry(activation_key(bb, ts, pooled, dtype, decoder))
    stats = compute_activations(bb.body, rows, eval_transform(ts), entry, batch_size, chunk_rows,
                                num_workers, device, on_progress, shard)
    rows = rows[~rows["image_id"].isin({f[0] for f in stats.failed})]  # the view is what downstream can read
    return entry, stats, view_key(entry.key, rows["image_id"], rows["label"])


class ReadOnlyStore(RuntimeError):
    """The store cannot be written, and the entry lacks rows or holds damage: nothing here can fix it."""


def repair_entry(entry: Entry, manifest: pd.DataFrame, writable: bool = True) -> VerifyReport:
    """Check every block the manifest's rows live in; drop damaged chunks so the next precompute
    recomputes their rows. A read-only store cannot be repaired or filled: ReadOnlyStore (a
    RuntimeError) if it lacks rows or holds damage, naming both counts."""
    ids = list(dict.fromkeys(ok_rows(manifest)["image_id"]))
    if writable:
        return entry.repair(ids)
    report = entry.verify(ids)
    missing = entry.missing(ids)
    if missing or report.damaged:
        raise ReadOnlyStore(f"activation store {entry.store.root} is read-only, and entry {entry.rel} lacks "
                           f"{len(missing)} of {len(ids)} rows and has {len(report.damaged)} damaged chunk(s): "
                           "point PRECOMPUTE_STORE at a writable store, or fill this one where it is writable")
    return report


def open_entry(store: ActivationStore, ref: ActivationsRef) -> Entry:
    """The entry an activations result points at (its key.json is put right if it was damaged).
    The rows are not checked here: ``check_same_weights`` and ``verify_entry`` do that."""
    return store.entry(require_typed(ref, ActivationsRef, "the activations result").key)


def check_same_weights(bb: Backbone, entry: Entry) -> None:
    if bb.weights_id != entry.key.weights_id:
        raise RuntimeError(f"weights changed since the activations were computed ({bb.weights_id} vs "
                           f"{entry.key.weights_id}): materialize the activations asset again")


def verify_entry(entry: Entry, manifest: pd.DataFrame, failed=()) -> dict[str, tuple[bool, dict]]:
    """The cache's health for one manifest: name -> (passed, details). ``failed`` is
    ``PrecomputeStats.failed``: those images have no row, and the checks name them with their reason."""
    rows = ok_rows(manifest)
    ids = list(dict.fromkeys(rows["image_id"]))
    missing = entry.missing(ids)
    reasons = {image_id: f"{path}: {reason}" for image_id, path, reason in failed}
    paths = rows.drop_duplicates("image_id").set_index("image_id")["path"]
    named = {"missing_images": [reasons.get(i, f"{paths[i]}: no row in the entry") for i in missing[:20]]}
    finite, checked, damage = True, 0, ""
    gone = set(missing)
    present = [i for i in ids if i not in gone]  # one missing row must not hide the others' values
    if present:
        try:  # every block read here is checked against its crc32c
            for _, block in entry.iter_blocks(present):
                finite &= bool(np.isfinite(block).all())
                checked += len(block)
        except CacheCorruption as exc:
            damage = str(exc)
    bad = manifest[manifest["status"] != "ok"]
    unexplained = bad[bad["reason"].fillna("").str.strip() == ""]
    return {
        "rows_match_manifest": (not missing, {"manifest_images": len(ids), "missing_rows": len(missing), **named}),
        "finite_values": (finite and not damage, {"rows_checked": checked}),
        "blocks_verified": (not missing and not damage, {"rows_read": checked, "damage": damage or "none"}),
        "every_image_accounted_for": (not missing and unexplained.empty,
                                      {"with_row": len(ids) - len(missing), "skipped_with_reason": len(bad),
                                       "unexplained": len(unexplained), "failed_at_precompute": len(failed), **named}),
    }


@dataclass(frozen=True)
class CacheSettings:
    """How the activations are computed and stored (the ``activations`` stage's settings)."""
    size: int | None = None        # image size; None: the arch's input size
    pooled: bool = True            # concat max+avg pool vector (fastai); False: spatial maps
    dtype: str = "float32"
    batch_size: int = 32
    chunk_rows: int = 256          # rows per committed chunk: the most a crash can lose
    weights: str = "pretrained"
    weights_path: str | None = None
    decoder: str = "pil"           # pil (CPU) or nvjpeg (JPEGs on the CUDA device): part of the entry's key
    DTYPES: ClassVar[tuple[str, ...]] = choices(StorageDtype)  # bfloat16 is stored as its bits

    def __post_init__(self):  # settings.ActivationSettings decides what is valid
        ActivationSettings.checked(**asdict(self))

    def check_weights(self, arch: str) -> None:
        """The weights ``arch`` would load exist (or may be downloaded); nothing is loaded or downloaded."""
        if self.weights_path is not None:
            path = Path(self.weights_path).expanduser()
            if not path.is_file():
                raise ConfigError(f"weights_path {self.weights_path} is not a file: point it at a state dict (.pt/.pth)")
            try:
                torch_file = looks_like_torch_file(path)  # 4 bytes; tensors are checked on load
            except OSError as e:
                raise ConfigError(f"weights_path {self.weights_path} cannot be read ({e.strerror or e}): "
                                  "fix its permissions") from None
            if not torch_file:
                raise ConfigError(f"weights_path {self.weights_path} is not a file torch.save writes (text, an "
                                  f"image?): point it at the state dict of {arch}, saved with "
                                  "torch.save(model.state_dict(), path)")
            return
        spec = get_arch(arch)
        if self.weights == "random" or (spec.source == "torchvision" and os.environ.get(ALLOW_DOWNLOAD_ENV) == "1"):
            return  # nothing to find, or fetched by the run itself
        try:
            resolve_weights_file(spec, self.weights, None)
        except (WeightsUnavailable, ValueError) as e:
            raise ConfigError(str(e)) from None


@dataclass
class CacheFill:
    """What filling the cache did: the reference later stages read, and the entry's health."""
    ref: ActivationsRef
    entry: Entry
    stats: PrecomputeStats
    repaired: VerifyReport
    checks: dict[str, tuple[bool, dict]]

    def metadata(self) -> dict:
        on_disk, raw = self.entry.nbytes_on_disk(), self.entry.raw_nbytes()
        return {"entry": self.entry.rel, "entry_key": self.entry.key.digest(), "view_key": self.ref.view_key,
                "key_parts": json.loads(json.dumps(self.entry.key.parts(), default=str)),
                **self.stats.as_dict(), "bytes_on_disk": on_disk,
                "compression_ratio": round(raw / on_disk, 3) if on_disk else 0.0, "codec": self.entry.codec(),
                "chunks_verified": len(self.repaired.verified),
                "chunks_unverified": len(self.repaired.unverified),  # written before checksums: not verifiable
                "chunks_repaired": self.repaired.damaged}


def fill_cache(manifest: pd.DataFrame, store: ActivationStore, arch: str, xtra_cut: int, settings: CacheSettings,
               writable: bool = True, num_workers: int = 0, device="cpu", on_progress=None, log=LOG) -> CacheFill:
    """The ``activations`` stage: damaged chunks dropped (so their rows are computed again), every
    missing row computed, and the entry checked against the manifest (``verify_entry``)."""
    s = settings
    check_decoder(s.decoder, device)  # before the weights load: nvjpeg without CUDA is a config error
    bb = load_backbone(arch, xtra_cut, s.weights, s.weights_path)
    ts = transform_for(bb.spec, s.size)
    repaired = repair_entry(store.entry(activation_key(bb, ts, s.pooled, s.dtype, s.decoder)), manifest, writable)
    if repaired.damaged:
        log.warning(f"dropped {len(repaired.damaged)} damaged chunk(s), their rows are recomputed: "
                    + "; ".join(repaired.damaged.values()))
    entry, stats, view = precompute(manifest, store, bb, ts, s.pooled, s.dtype, s.batch_size, s.chunk_rows,
                                    num_workers, device, on_progress, decoder=s.decoder)
    log.info(f"activations {entry.rel}: {stats.computed} computed, {stats.reused} reused, "
             f"{stats.images_per_s:.1f} img/s, {entry.nbytes_on_disk() / 2**20:.1f} MiB on disk")
    if stats.failed:  # the run goes on without them (no rows: later stages leave them out); the checks name them
        log.warning(f"{len(stats.failed)} images failed to decode or transform and have no row: "
                    + "; ".join(f"{path}: {reason}" for _, path, reason in stats.failed[:10]))
    ref = ActivationsRef.of(entry, view, s.weights, s.weights_path, stats.failed)
    return CacheFill(ref, entry, stats, repaired, verify_entry(entry, manifest, stats.failed))
