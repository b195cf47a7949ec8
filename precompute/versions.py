"""Code versions: bump one when its result changes for the same inputs.

Here, with no import at all, so the Dagster definitions name them (an asset's ``code_version``)
without loading torch or zarr (issue 20: the definitions load light).
"""

# The activation cache (precompute.store.CODE_VERSION, part of every cache key): bump when the way
# activations are computed changes in a way the other key parts miss.
CODE_VERSION = "2"  # 2: bodies run channels-last (archs.channels_last); values move by float32 rounding

SWEEP_CODE_VERSION = "1"  # precompute.sweep: a head sweep's result
