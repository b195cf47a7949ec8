import dagster as dg

from precompute.manifest import manifest_report

from precompute.quality.overrides import OverrideError, apply_overrides, overrides_path
from resources import ImageSource, project_home


@dg.asset(group_name="recipe", code_version="1")
def image_manifest(context: dg.AssetExecutionContext, images: ImageSource):
    """One row per image: content hash, path, label, split, size, status and reason.

    Its data version is a digest of the image ids, labels, splits and statuses, so the assets
    downstream go stale exactly when the images change (not when a file is only touched).
    """
    scan = images.scan()
    manifest = images.manifest(scan)
    try:  # a user's drop/relabel rows (data_quality.csv's columns): a new data version; no file is deleted
        manifest, overrides = apply_overrides(manifest, overrides_path(project_home()))
    except OverrideError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc
    version, metadata = manifest_report(manifest, scan.stats, str(images.resolve()), context.log)
    md = {k: dg.MetadataValue.md(metadata.pop(k)) for k in ("not_usable", "counts")}
    json = {k: dg.MetadataValue.json(metadata.pop(k)) for k in ("scan", "summary")}
    md["overrides"] = dg.MetadataValue.md(overrides.to_markdown(index=False) if len(overrides) else "none")
    return dg.Output(manifest, data_version=dg.DataVersion(version), metadata={**metadata, **md, **json})
