"""arch x cut partitions. The cut is relative to the arch's table cut: 0 = fastai's cut, 1 = one
child earlier (xtra_cut), so every pair is valid. PRECOMPUTE_ARCHS / PRECOMPUTE_CUTS extend them."""

import os

import dagster as dg

from precompute.archs import DEFAULT_ARCH

ARCHS = [a.strip() for a in os.environ.get("PRECOMPUTE_ARCHS", f"{DEFAULT_ARCH},resnet34").split(",") if a.strip()]
CUTS = [c.strip() for c in os.environ.get("PRECOMPUTE_CUTS", "0,1").split(",") if c.strip()]

arch_cut = dg.MultiPartitionsDefinition({
    "arch": dg.StaticPartitionsDefinition(ARCHS),
    "cut": dg.StaticPartitionsDefinition(CUTS),
})
DEFAULT_PARTITION = f"{ARCHS[0]}|{CUTS[0]}"


def arch_and_cut(context: dg.AssetExecutionContext) -> tuple[str, int]:
    keys = context.partition_key.keys_by_dimension
    return keys["arch"], int(keys["cut"])
