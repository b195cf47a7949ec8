"""The codecs a new chunk's blocks may be written with (``ActivationStore(compressor=...)``); any of
them reads back (precompute.store.blocks decodes them). Codecs are lossless and not part of the key."""

import zarr.codecs

COMPRESSORS = {
    # Blosc from numcodecs (zarr's BloscCodec wraps numcodecs.blosc). Activations after ReLU/ReLU6
    # hold runs of exact zeros (and 6.0s), which LZ4 finds in whole 4-byte words; byte shuffling
    # splits them (benchmarks/store_compression.py compares the codecs).
    "blosc-lz4-noshuffle": lambda: zarr.codecs.BloscCodec(cname="lz4", clevel=9, shuffle="noshuffle"),
    "blosc-zstd": lambda: zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
    "blosc-lz4": lambda: zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    "zstd": lambda: zarr.codecs.ZstdCodec(level=3),
    "none": lambda: None,
}
# "auto", the default: LZ4 for spatial maps, which it shrinks several times, and raw bytes for
# pooled vectors, which it barely shrinks while decoding them costs read speed (see RESULTS.md).
AUTO_COMPRESSOR = {"spatial": "blosc-lz4-noshuffle", "pooled": "none"}
DEFAULT_COMPRESSOR = "auto"
