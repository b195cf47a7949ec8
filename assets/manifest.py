import dagster as dg

from precompute.data import manifest_summary

from resources import ImageSource


@dg.asset(group_name="recipe", code_version="1")
def image_manifest(context: dg.AssetExecutionContext, images: ImageSource):
    """One row per image: content hash, path, label, split, size, status and reason."""
    manifest = images.manifest()
    bad = manifest[manifest["status"] != "ok"]
    for row in bad.itertuples():
        context.log.warning(f"skipped {row.relpath}: {row.status} ({row.reason})")
    counts = manifest.groupby(["split", "label", "status"]).size().rename("images").reset_index()
    return dg.Output(manifest, metadata={
        "source": str(images.resolve()),
        "images": len(manifest),
        "ok": int((manifest["status"] == "ok").sum()),
        "not_usable": dg.MetadataValue.md(bad[["relpath", "status", "reason"]].to_markdown(index=False)
                                          if len(bad) else "none"),
        "counts": dg.MetadataValue.md(counts.to_markdown(index=False)),
        "summary": dg.MetadataValue.json(manifest_summary(manifest)),
    })
