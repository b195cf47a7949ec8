import dagster as dg

from precompute.manifest import manifest_summary
from precompute.scan_index import manifest_digest

from resources import ImageSource


@dg.asset(group_name="recipe", code_version="1")
def image_manifest(context: dg.AssetExecutionContext, images: ImageSource):
    """One row per image: content hash, path, label, split, size, status and reason.

    Its data version is a digest of the image ids, labels, splits and statuses, so the assets
    downstream go stale exactly when the images change (not when a file is only touched).
    """
    scan = images.scan()
    manifest = images.manifest(scan)
    context.log.info(f"scan: {scan.stats.get('read', 0)} files read, {scan.stats.get('reused', 0)} unchanged "
                     f"(scan index {scan.stats.get('index') or 'off'}) in {scan.stats.get('seconds', 0):.1f}s")
    bad = manifest[manifest["status"] != "ok"]
    for row in bad.itertuples():
        context.log.warning(f"skipped {row.relpath}: {row.status} ({row.reason})")
    counts = manifest.groupby(["split", "label", "status"]).size().rename("images").reset_index()
    version = manifest_digest(manifest)
    return dg.Output(manifest, data_version=dg.DataVersion(version), metadata={
        "source": str(images.resolve()),
        "images": len(manifest),
        "ok": int((manifest["status"] == "ok").sum()),
        "manifest_digest": version,
        "scan": dg.MetadataValue.json({k: v for k, v in scan.stats.items() if v is not None}),
        "not_usable": dg.MetadataValue.md(bad[["relpath", "status", "reason"]].to_markdown(index=False)
                                          if len(bad) else "none"),
        "counts": dg.MetadataValue.md(counts.to_markdown(index=False)),
        "summary": dg.MetadataValue.json(manifest_summary(manifest)),
    })
