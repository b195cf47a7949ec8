"""Run the frozen body over images once and commit the activations to the store, chunk by chunk.

On a CUDA device, batches go up from pinned memory on a side stream and outputs come back without
blocking (``DeviceFeed``), and JPEGs may be decoded on the GPU (``decoder: nvjpeg``, ``DeviceDecoder``).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from precompute.archs import as_channels_last, channels_last
from precompute.heads import concat_pool
from precompute.images import ImageLoadError
from precompute.settings import Decoder, choices
from precompute.store import Entry
from precompute.store.dtypes import from_torch, to_numpy
from precompute.transforms import EncodedImageDataset, ImageDataset, decode_transform

DECODERS = choices(Decoder)  # where images are decoded: the CPU (PIL), or JPEGs on the CUDA device

log = logging.getLogger(__name__)


@dataclass
class PrecomputeStats:
    images: int          # distinct image contents the manifest asks for
    computed: int        # rows run through the body in this call
    reused: int          # rows already in the entry
    chunks: int          # chunks committed in this call
    seconds: float
    # (image_id, path, reason) of images that failed to read, decode or transform, or whose bytes changed since
    # the scan (reason "changed_since_scan: ..."): no row, never zeros, never another picture's row
    failed: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {**self.__dict__, "failed": len(self.failed), "failed_images": [list(f) for f in self.failed],
                "images_per_s": round(self.images_per_s, 2)}


class _Isolated(Dataset):
    """(index, tensor or None, encoded, reason): one image that fails is reported, not raised, so the run
    goes on. ``encoded``: the tensor is a JPEG's bytes for the device decoder (EncodedImageDataset)."""

    def __init__(self, images: ImageDataset | EncodedImageDataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            x, encoded = self.images[i]
        except ImageLoadError as e:
            return i, None, False, e.reason
        return i, x, isinstance(self.images, EncodedImageDataset) and encoded, ""


class _Batch(NamedTuple):  # a NamedTuple: DataLoader's pin_memory pins its tensors and keeps its type
    pixel_index: list[int]         # images decoded and transformed on the CPU ...
    pixels: torch.Tensor | None    # ... as one batch
    jpeg_index: list[int]          # JPEGs left for the device decoder ...
    jpegs: list[torch.Tensor]      # ... as their bytes
    bad: list[tuple[int, str]]     # (index, reason) of images that failed


def _collate(items) -> _Batch:
    pixels = [(i, x) for i, x, encoded, _ in items if x is not None and not encoded]
    jpegs = [(i, x) for i, x, encoded, _ in items if encoded]
    return _Batch([i for i, _ in pixels], torch.stack([x for _, x in pixels]) if pixels else None,
                  [i for i, _ in jpegs], [x for _, x in jpegs], [(i, reason) for i, x, _, reason in items if x is None])


class DeviceDecoder:
    """JPEG bytes -> transformed pixels on ``device``, a batch at a time: torchvision's decode_jpeg
    (nvjpeg on a CUDA device), then ``transform`` there. torchvision decodes a list all or nothing, so
    a failed batch is decoded again image by image, and an image the device decoder refuses is decoded
    on the CPU (``load_rgb``) instead: one bad file costs that file, never the batch."""

    def __init__(self, transform: Callable, device: str | torch.device):
        self.transform, self.device = transform, torch.device(device)
        self.fallbacks = 0  # images the device decoder failed on, decoded on the CPU instead

    def _decode(self, data):
        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():  # deprecated for TorchCodec in torchvision 0.29; still the nvjpeg path
            warnings.simplefilter("ignore")
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)

    def decode(self, jpegs: list[torch.Tensor]) -> list[torch.Tensor | Exception]:
        """Each JPEG as a uint8 (3, H, W) tensor on the device, or the exception decoding it raised."""
        if not jpegs:
            return []
        try:
            return list(self._decode(list(jpegs)))
        except (RuntimeError, ValueError):  # torchvision's decode errors
            out: list[torch.Tensor | Exception] = []
            for data in jpegs:
                try:
                    out.append(self._decode(data))
                except (RuntimeError, ValueError) as e:
                    out.append(e)
            return out

    def __call__(self, index: list[int], jpegs: list[torch.Tensor], paths: list[str]):
        """(positions whose pixels came out, their (n, 3, size, size) batch on the device or None,
        [(position, reason)] of images that failed on the device and on the CPU)."""
        good, rows, bad = [], [], []
        for i, data, img in zip(index, jpegs, self.decode(jpegs)):
            try:
                if isinstance(img, Exception):
                    self.fallbacks += 1
                    log.info("device decoder failed on %s (%s): decoded on the CPU", paths[i], img)
                    x = decode_transform(paths[i], self.transform, data.numpy().tobytes()).to(self.device)
                else:
                    x = self.transform(img)
            except ImageLoadError as e:
                bad.append((i, e.reason))
                continue
            good.append(i)
            rows.append(x.as_subclass(torch.Tensor))  # plain tensors: v2 transforms return tv_tensors
        return good, torch.stack(rows) if rows else None, bad


class DeviceFeed:
    """Copies between host and device for the precompute loop. On CUDA a batch (in pinned memory, from
    the DataLoader) goes up on a side stream, so the copy overlaps the body still running on the
    previous batch, and an output comes back without blocking: ``Pending.result()`` waits for it one
    batch later. On the CPU both are pass-throughs."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cuda or x.device.type == "cuda":
            return x
        with torch.cuda.stream(self.stream):
            y = x.to(self.device, non_blocking=True)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.stream)  # the body reads y only once the copy is done
        y.record_stream(compute)  # y's memory is not reused before the body is done with it
        return y

    def to_host(self, out: torch.Tensor) -> "Pending":
        if not self.cuda:
            return Pending(out, None)
        host = out.to("cpu", non_blocking=True)  # into pinned memory: a real asynchronous copy
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return Pending(host, event)


class Pending(NamedTuple):
    tensor: torch.Tensor
    event: "torch.cuda.Event | None"

    def result(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.tensor


def check_decoder(decoder: str, device: str | torch.device) -> None:
    """``decoder`` is one this machine can run: ConfigError before any work otherwise."""
    from precompute.train import ConfigError

    if decoder not in DECODERS:
        raise ConfigError(f"decoder {decoder!r}: choose one of {', '.join(DECODERS)} (pil decodes on the CPU, "
                          "nvjpeg decodes JPEGs on the CUDA device)")
    if decoder == "nvjpeg" and (torch.device(device).type != "cuda" or not torch.cuda.is_available()):
        why = "no CUDA device is available here" if not torch.cuda.is_available() else f"the device is {device}"
        raise ConfigError(f"decoder 'nvjpeg' decodes JPEGs on a CUDA device, and {why}: set decoder: pil, or run "
                          "on a machine with CUDA (PRECOMPUTE_DEVICE=auto or cuda)")


def in_shard(image_id: str, index: int, count: int) -> bool:
    return int(image_id[:8], 16) % count == index


@torch.inference_mode()
def compute_activations(body: nn.Module, manifest: pd.DataFrame, transform: Callable, entry: Entry,
                        batch_size: int = 32, chunk_rows: int = 256, num_workers: int = 0,
                        device: str | torch.device = "cpu",
                        on_progress: Callable[[int, int], None] | None = None,
                        shard: tuple[int, int] = (0, 1)) -> PrecomputeStats:
    """Compute the rows of ``manifest`` (ok rows, columns image_id and path) missing from ``entry``.

    An image whose bytes no longer hash to its ``image_id`` (changed since the scan) gets no row:
    it is in ``failed`` with a reason starting ``changed_since_scan``, as any image that fails here.

    Memory holds one chunk of outputs at most (``chunk_rows``); each full chunk is committed
    before the next is started, so a crash loses at most one chunk of work. ``shard=(i, n)``
    takes only the images whose hash falls in shard i of n: n processes (Dagster steps) fill one
    entry in parallel with disjoint chunks. The entry's key says how images are decoded
    (``decoder``: pil on the CPU, or nvjpeg on the CUDA device, see ``DeviceDecoder``) and the
    storage dtype; outputs are converted to it on the device.
    """
    check_decoder(entry.key.decoder, device)  # before any work
    start = time.perf_counter()
    first_paths = manifest.drop_duplicates("image_id").set_index("image_id")["path"]
    index, count = shard
    if count > 1:
        first_paths = first_paths[[in_shard(i, index, count) for i in first_paths.index]]
    todo = entry.claim(first_paths.index)  # the lease first: gc sees it, or took the entry before this
    n_images = len(first_paths)
    device = torch.device(device)
    body = channels_last(body.eval().to(device))  # faster on CPU and GPU: see archs.channels_last
    committed = 0
    failed: list[tuple[str, str, str]] = []
    if todo:
        paths = [str(first_paths[i]) for i in todo]
        on_device = entry.key.decoder == "nvjpeg"
        # each image's bytes are read once, checked against its image_id and decoded from those bytes: a file
        # replaced since the scan is a failed row (changed_since_scan), never a row under the old image's hash
        images = (EncodedImageDataset(paths, transform, image_ids=todo) if on_device
                  else ImageDataset(paths, None, transform, image_ids=todo))
        decoder = DeviceDecoder(transform, device) if on_device else None
        feed = DeviceFeed(device)
        dtype = entry.key.dtype
        with entry.writing():  # a lease: housekeeping leaves the entry alone while it fills
            loader = DataLoader(_Isolated(images), batch_size=batch_size, num_workers=num_workers, shuffle=False,
                                collate_fn=_collate, persistent_workers=False, pin_memory=feed.cuda)
            ids: list[str] = []
            buffer: list[np.ndarray] = []
            seen = 0
            pending: tuple[Pending, list[str]] | None = None
            bar = tqdm(total=len(todo), desc=f"precompute {entry.key.arch}", unit="img", disable=None)

            def take(p: tuple[Pending, list[str]]) -> None:
                nonlocal ids, buffer, committed
                buffer.append(to_numpy(p[0].result(), dtype))
                ids += p[1]
                if len(ids) >= chunk_rows:
                    entry.commit(ids, np.concatenate(buffer))
                    committed += 1
                    ids, buffer = [], []
                    if on_progress:
                        on_progress(seen, len(todo))

            for batch in loader:
                good, parts, bad = list(batch.pixel_index), [], list(batch.bad)
                if batch.pixels is not None:
                    parts.append(feed.to_device(batch.pixels))
                if batch.jpegs:
                    decoded, x_dev, failed_dev = decoder(batch.jpeg_index, batch.jpegs, paths)
                    good += decoded
                    bad += failed_dev
                    if x_dev is not None:
                        parts.append(x_dev)
                for i, reason in bad:  # no row for it: the asset's checks name it, a rerun tries it again
                    failed.append((todo[i], paths[i], reason))
                    log.warning("precompute %s: %s failed, left out: %s", entry.key.arch, paths[i], reason)
                new = None
                if parts:
                    out = body(as_channels_last(torch.cat(parts) if len(parts) > 1 else parts[0]))
                    if entry.key.pooled:
                        out = concat_pool(out)
                    new = (feed.to_host(from_torch(out, dtype)), [todo[i] for i in good])
                seen += len(batch.pixel_index) + len(batch.jpeg_index) + len(batch.bad)
                bar.update(len(batch.pixel_index) + len(batch.jpeg_index) + len(batch.bad))
                if pending is not None:  # the previous batch's output: its copy is done by now on a GPU
                    take(pending)
                pending = new
            if pending is not None:
                take(pending)
            if ids:
                entry.commit(ids, np.concatenate(buffer))
                committed += 1
                if on_progress:
                    on_progress(seen, len(todo))
            bar.close()
            if decoder is not None and decoder.fallbacks:
                log.warning("precompute %s: the device decoder failed on %d image(s), decoded on the CPU instead",
                            entry.key.arch, decoder.fallbacks)
    entry.confirm(set(first_paths.index) - {f[0] for f in failed})  # every row reported is there, or an error
    stats = PrecomputeStats(n_images, len(todo) - len(failed), n_images - len(todo), committed,
                            time.perf_counter() - start, failed)
    log.info("precompute %s: %d computed, %d reused, %d failed, %.1f img/s", entry.rel, stats.computed,
             stats.reused, len(failed), stats.images_per_s)
    return stats
