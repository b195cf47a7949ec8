"""benchmarks/imagenet_scale.py at 2,000 images in 20 classes: every stage runs and its figures are sane.

The full benchmark (128,000 images and more) is not part of `make test`; this runs the very same
stages, each in its own process, with the precompute on a 2-worker Dask LocalCluster.
"""

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_imagenet_scale_small(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    import imagenet_scale as bench

    bench.set_classes(20)
    try:
        res = bench.measure(2000, folder=tmp_path / "images", work=tmp_path)
    finally:
        bench.set_classes(1000)
    s = res["stages"]
    assert list(s) == list(bench.STAGES)
    for name, r in s.items():  # every stage was timed and its process's memory seen
        assert r["seconds"] > 0 and r["peak_rss"] > 0, name
        assert [role for role, _ in r["processes"]][0] == "stage" and r["processes"][0][1] > 0, name
    assert s["generate"]["written"] == 2000
    assert s["cold_scan"]["read"] == s["cold_scan"]["ok"] == 2000 and s["warm_scan"]["read"] == 0
    assert s["new_images"]["new"] == s["new_images"]["read"] == 20 and s["new_images"]["ok"] == 2020
    assert s["cold_scan"]["index_bytes"] > 0 and s["cold_scan"]["manifest_bytes"] > 0
    pre = s["precompute"]
    assert pre["computed"] == 2020 and pre["reused"] == 0 and len(pre["shard_images_per_s"]) == 2
    assert [role for role, _ in pre["processes"]].count("dask worker") == 2  # the shards ran in 2 worker processes
    assert pre["store_objects"] > 2 and pre["store_bytes"] > 2020 * 2560 * 2  # 2,560 float16 values a row
    assert pre["worker_log_lines"] >= 2  # the workers' starts reached the Dagster log
    assert s["head_epoch"]["streamed"] and s["head_epoch"]["images"] + s["evaluation"]["images"] == 2020
    assert s["evaluation"]["accuracy"] > 2 / 20  # chance is 1/20: the classes are learnable from the cache
    assert s["sensor_first"]["runs"] >= 1 and s["sensor_unchanged"]["runs"] == 0
    assert "unchanged" in s["sensor_unchanged"]["skip"]
    text = bench.section([res])
    assert "**2,000 images (measured)**" in text and "| precompute |" in text
