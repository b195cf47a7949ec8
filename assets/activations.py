import json
from typing import Optional

import dagster as dg

from assets.partitions import arch_and_cut, arch_cut
from precompute import recipe
from precompute.store import CODE_VERSION
from resources import ActivationStoreResource, ComputeDevice


class ActivationsConfig(dg.Config):
    size: Optional[int] = None        # image size; None: the arch's input size
    pooled: bool = True               # concat max+avg pool vector (fastai); False: spatial maps
    dtype: str = "float32"            # storage dtype: float32 or float16
    batch_size: int = 32
    chunk_rows: int = 256             # rows per committed chunk: the most a crash can lose
    weights: str = "pretrained"       # or "random"
    weights_path: Optional[str] = None


@dg.asset(group_name="recipe", partitions_def=arch_cut, code_version=CODE_VERSION,
          tags={"precompute/cacheable": "true"})
def activations(context: dg.AssetExecutionContext, config: ActivationsConfig, image_manifest,
                store: ActivationStoreResource, compute: ComputeDevice):
    """The frozen body's activations for every ok image, in the Zarr cache (computed once)."""
    if config.dtype not in ("float32", "float16"):
        raise dg.Failure(f"dtype {config.dtype!r}: use float32 or float16")
    arch, xtra_cut = arch_and_cut(context)
    device = compute.setup()
    act_store = store.get()
    act_store.check_reachable()
    bb = recipe.load_backbone(arch, xtra_cut, config.weights, config.weights_path)
    ts = recipe.transform_for(bb.spec, config.size)
    entry, stats, view = recipe.precompute(
        image_manifest, act_store, bb, ts, config.pooled, config.dtype, config.batch_size,
        config.chunk_rows, compute.num_workers, device,
        on_progress=lambda done, total: context.log.info(f"precompute {done}/{total} images"))
    ref = {"store": act_store.root, "entry": entry.rel, "key": entry.key.parts(), "view_key": view,
           "weights": config.weights, "weights_path": config.weights_path}
    return dg.Output(ref, data_version=dg.DataVersion(view), metadata={
        "entry": entry.rel,
        "entry_key": entry.key.digest(),
        "view_key": view,
        "key_parts": dg.MetadataValue.json(json.loads(json.dumps(entry.key.parts(), default=str))),
        **{k: dg.MetadataValue.float(float(v)) if isinstance(v, float) else v for k, v in stats.as_dict().items()},
        "bytes_on_disk": entry.nbytes_on_disk(),
    })
