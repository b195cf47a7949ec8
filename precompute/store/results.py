"""Results derived from an entry and kept beside it, e.g. a head trained on its rows.

A result is a cache too: losing one costs a retraining, never a wrong number, so a store that
cannot take the write (read-only, full) is worth a warning, not a failed run.
"""

from __future__ import annotations

import logging

from precompute.store.entry import Entry

log = logging.getLogger(__name__)


class ResultCache:
    def __init__(self, entry: Entry):
        self.entry = entry
        self.folder = f"{entry.path}/results"

    def put(self, name: str, data: bytes) -> bool:
        """Keep ``data`` under ``name``, written atomically; False (with a warning) if the store refused."""
        try:
            self.entry.store.put(f"{self.entry.rel}/results/{name}", data)
            return True
        except OSError as exc:
            log.warning("could not keep %s beside cache entry %s (%s): it will be computed again next time",
                        name, self.entry.rel, exc)
            return False

    def get(self, name: str) -> bytes | None:
        try:
            return self.entry.store.fs.cat_file(f"{self.folder}/{name}")
        except FileNotFoundError:
            return None
