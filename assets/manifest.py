import dagster as dg

from assets._util import LazyModule
from assets.metadata import ManifestMetadata
from resources import ImageSource, project_home

manifest_module = LazyModule("precompute.manifest")  # pandas loads when the step runs, not with the definitions
overrides_module = LazyModule("precompute.quality.overrides")


@dg.asset(group_name="recipe", code_version="1")
def image_manifest(context: dg.AssetExecutionContext, images: ImageSource):
    """One row per image: content hash, path, label, split, size, status and reason.

    Its data version is a digest of the image ids, labels, splits and statuses, so the assets
    downstream go stale exactly when the images change (not when a file is only touched).
    """
    scan = images.scan()
    manifest = images.manifest(scan)
    try:  # a user's drop/relabel rows (data_quality.csv's columns): a new data version; no file is deleted
        manifest, overrides = overrides_module.apply_overrides(manifest, overrides_module.overrides_path(project_home()))
    except overrides_module.OverrideError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc
    version, metadata = manifest_module.manifest_report(manifest, scan.stats, str(images.resolve()), context.log)
    shown = ManifestMetadata(**metadata, overrides=overrides.to_markdown(index=False) if len(overrides) else "none")
    return dg.Output(manifest, data_version=dg.DataVersion(version), metadata=shown.to_metadata())
