"""What a Learner writes and reads (``export``, ``save``, ``load``) and how it describes itself."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from precompute.archs import describe_groups
from precompute.inference import rebuild
from precompute.learner_settings import describe_aug
from precompute.manifest import ok_rows
from precompute.records import checked_record
from precompute.train import ConfigError


class LearnerFiles:
    """``export``, ``save``, ``load`` and ``summary`` of ``precompute.learner.Learner``."""

    def _record_file(self) -> dict:
        return self.record.to_dict(groups=False)  # as records.save_model writes it

    def export(self, path: str | os.PathLike) -> Path:
        """The current stage record as a model file: ``precompute predict --model PATH`` and
        ``precompute.predict.load_model`` read it (``torch.load(weights_only=True)``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self._record_file(), path)
        return path

    def save(self, path: str | os.PathLike) -> Path:
        """``export``'s file plus this Learner's settings (frozen groups, precompute, aug_tfms),
        so ``load`` continues where this left off."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**self._record_file(), "learner": {"frozen": self._frozen, "precompute": self._precompute,
                                                        "aug_tfms": self._aug, "fits": self._fits}}, path)
        return path

    def load(self, path: str | os.PathLike) -> None:
        """A file of ``save`` (or ``export``) into this Learner: same arch, cut, classes and transform."""
        raw = torch.load(path, map_location="cpu", weights_only=True)
        settings = (raw.pop("learner", None) if isinstance(raw, dict) else None) or {}
        record = checked_record(raw, f"model file {path}")
        for name, theirs, mine in (("arch", record.arch, self.spec.name), ("xtra_cut", record.xtra_cut, self.xtra_cut),
                                   ("classes", record.classes, self.classes),
                                   ("transform", record.transform.key(), self.transform.key())):
            if theirs != mine:
                raise ConfigError(f"{path}: {name} is {theirs!r}, this Learner's is {mine!r}; "
                                  "load it into a Learner.pretrained(...) made with the same settings")
        self._precompute, self._aug = False, None
        _, self.model, _ = rebuild(record, record.transform.size)  # a new network: the cache's body stays as loaded
        self.record = record
        self._fits = int(settings.get("fits", 0))
        self.freeze_to(int(settings.get("frozen", self.n_groups - 1)))
        if settings.get("precompute"):
            self.precompute = True
        self.aug_tfms = settings.get("aug_tfms")

    def summary(self) -> str:
        """Which layer groups train, at which rate last, and whether inputs come from the cache or images."""
        n = self.n_groups
        n_train, n_valid = len(ok_rows(self.manifest, "train")), len(ok_rows(self.manifest, "valid"))
        kind = "multi-label tags" if self.multilabel else "classes"
        lines = [f"Learner: {self.spec.name} (xtra_cut={self.xtra_cut}, weights {self.weights_id[:24]}), "
                 f"{self.transform.size} px, {len(self.classes)} {kind} ({', '.join(self.classes[:6])}"
                 f"{', ...' if len(self.classes) > 6 else ''}), {n_train} train / {n_valid} valid images"]
        if self._precompute:
            where = f"store {self.store.root}" + (f", entry {self._entry.rel}" if self._entry is not None else "")
            lines.append(f"inputs: cached activations: the body does not run, only the head trains ({where})")
        else:
            lines.append(f"inputs: images ({describe_aug(self._aug)}): the whole network runs every batch")
        trains = list(range(self._frozen, n))
        lines.append(f"layer groups: {n}; {'group' if len(trains) == 1 else 'groups'} "
                     f"{', '.join(map(str, trains)) or 'none'} train, {self._frozen} frozen")
        last_lrs = [g["lr"] for g in self.record.groups] if self.record.groups else [None] * n
        described = describe_groups(self.groups)
        whats = [f"{g['layers'][0]} .. {g['layers'][-1]} ({len(g['layers'])} layers)" if len(g["layers"]) > 1
                 else g["layers"][0] for g in described]
        width = max(map(len, whats))
        for g, what, lr in zip(described, whats, last_lrs):
            name = "head" if g["index"] == n - 1 else "body"
            state = "trains" if g["index"] >= self._frozen else "frozen"
            lr_text = f" (last lr {lr:.2e})" if lr else ""
            lines.append(f"  {g['index']}  {name}  {what:<{width}}  {g['n_params']:>10,} params  {state}{lr_text}")
        history = self.record.history
        if not history:
            lines.append(f"stage: {self.record.stage} (a new head, not trained yet)")
        else:
            lines.append(f"stage: {self.record.stage}, epochs: {len(history)}, valid accuracy "
                         f"{history[-1]['valid_accuracy']:.4f}, loss {history[-1]['valid_loss']:.4f}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython: the same text, not a one-line repr
        p.text(self.summary())
