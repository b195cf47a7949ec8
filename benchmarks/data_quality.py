"""data_quality on real photos with planted faults: detection precision and recall, and its cost.

A copy of ../shared/data/dogscats gets 20 near-duplicates across splits (copies of training photos,
resized and re-encoded, slightly cropped, or colour-jittered, placed in valid under the same class)
and 20 flipped training labels (a photo moved to the other class folder). The recipe's
image_manifest -> activations -> data_quality run through Dagster (SQLite instance, MLflow sqlite),
then the findings are scored against what was planted:

- duplicates: a planted pair counts as found when data_quality reports it (either order) as a
  duplicate or leak; every reported pair that is not planted is a false positive
  (dogscats itself may hold real near-duplicates: they are listed, not hidden);
- label errors: a flipped photo counts as found when reported as a label issue.

Writes the "data_quality" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _images import DOGSCATS, OUT, write_section

from precompute.quality.planting import copy_tree, plant_faults

N_DUPLICATES, N_FLIPS = 20, 20
