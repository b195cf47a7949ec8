import dagster as dg

from assets._util import LazyModule
from resources import ImageSource

manifest_module = LazyModule("precompute.manifest")  # pandas loads when the step runs, not with the definitions


@dg.asset(group_name="recipe", code_version="1")
def image_manifest(context: dg.AssetExecutionContext, images: ImageSource):
    """One row per image: content hash, path, label, split, size, status and reason.

    Its data version is a digest of the image ids, labels, splits and statuses, so the assets
    downstream go stale exactly when the images change (not when a file is only touched).
    """
    scan = images.scan()
    manifest = images.manifest(scan)
    version, metadata = manifest_module.manifest_report(manifest, scan.stats, str(images.resolve()), context.log)
    md = {k: dg.MetadataValue.md(metadata.pop(k)) for k in ("not_usable", "counts")}
    json = {k: dg.MetadataValue.json(metadata.pop(k)) for k in ("scan", "summary")}
    return dg.Output(manifest, data_version=dg.DataVersion(version), metadata={**metadata, **md, **json})
