"""A chunk's commit record: written last, it makes the chunk count. It names the entry it belongs
to and carries its own sha256, so an edited, damaged or copied-in record is never served."""

from __future__ import annotations

import json

from precompute.store.key import digest

RECORD_FORMAT = 3  # 2: block and zarr.json digests, and the record's own sha256; 3: the entry it belongs to


def parse_record(chunk: str, blob: bytes) -> dict:
    """A commit record checked for shape and, from format 2 on, against its own sha256."""
    try:
        r = json.loads(blob)
        ok = (isinstance(r, dict) and r.get("chunk") == chunk and isinstance(r.get("ids"), list)
              and isinstance(r.get("shape"), list) and r["shape"] and r["shape"][0] == len(r["ids"]))
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"does not parse ({type(exc).__name__}: {exc})") from None
    if not ok:
        raise ValueError("is not a commit record of this chunk")
    if r.get("format", 1) >= 2:
        body = {k: v for k, v in r.items() if k != "sha256"}
        if r.get("sha256") != digest(body):
            raise ValueError("fails its sha256 (edited or damaged)")
    if r.get("format", 1) >= 3 and not (isinstance(r.get("entry"), str) and isinstance(r.get("key_digest"), str)):
        raise ValueError("does not name the entry it belongs to")
    return r


def not_ours(rel: str, their_entry, their_key_digest) -> str:
    """Why a record or chunk naming ``their_entry`` / ``their_key_digest`` is not part of the entry
    at ``rel`` ("" when it is). An entry's folder name is its key's digest."""
    if their_entry == rel and their_key_digest == rel.rsplit("/", 1)[-1]:
        return ""
    return f"belongs to entry {their_entry} (key {their_key_digest}), not to {rel}"
