"""Many heads on one cache: a grid or random search over lr, dropout, hidden sizes, epochs, weight
decay and label smoothing, trained in one process, single- or multi-label.

Heads of the same shape (``xtra_fc`` and ``epochs``) train together: ``torch.func.vmap`` of
``functional_call`` runs them as one batched forward over their parameters, stacked each step (as
``torch.func.stack_module_state`` would, but from leaves the optimizer holds). Each head is one parameter group of torch's
AdamW, with its own learning rate, weight decay and one-cycle schedule (torch's OneCycleLR moves
lr and beta1 per group); its loss is the task's (cross-entropy with its label smoothing, or BCE).

The batched sweep computes what ``train.fit_head_on_cache`` computes for each configuration alone,
within float tolerance, dropout included:

- each head starts from ``torch.manual_seed(seed); build_head(...)``, as the Learner builds a head;
- the batches come in the same order (one ``torch.Generator`` seeded with ``seed``);
- each head's dropout masks come from its own generator seeded with ``seed``, drawn in the order and
  the shapes ``nn.Dropout`` draws them from the global generator in ``fit`` (which seeds it with
  ``seed``); a rate of 0 draws nothing, as in torch.

``head_sweep(..., batched=False)`` trains the same configurations one by one through
``fit_head_on_cache``: the reference the tests and ``benchmarks/head_sweep.py`` compare against.
Heads of fastai's shape only (no custom head).
"""
from __future__ import annotations

import copy
import itertools
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from precompute.heads import _expand_ps, build_head, concat_pool
from precompute.rows import DEFAULT_MEMORY_BUDGET, cached_rows
from precompute.settings import check_head_shape, check_sweep_values
from precompute.task import MultiLabel, Task
from precompute.train import SINGLE_LABEL, ArrayRows, ConfigError, Schedule, StreamedRows, fit_head_on_cache
from precompute.versions import SWEEP_CODE_VERSION

CONFIG_COLUMNS = ["lr", "ps", "xtra_fc", "epochs", "wd", "label_smoothing"]


@dataclass(frozen=True)
class SweepConfig:
    """One head of a sweep and how it trains (``heads.HeadConfig`` is the head alone, as a stage
    record keeps it): ``ps`` None is fastai's 0.25 ... 0.5; a float is one rate for every block."""

    lr: float = 3e-3
    ps: float | tuple[float, ...] | None = None
    xtra_fc: tuple[int, ...] = (512,)
    epochs: int = 5
    wd: float = 1e-2
    label_smoothing: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "xtra_fc", tuple(int(v) for v in self.xtra_fc))
        if isinstance(self.ps, (list, tuple)):
            object.__setattr__(self, "ps", tuple(float(v) for v in self.ps))
        # the rules of precompute.settings (SweepSettings checks the sweep's lists with the same)
        check_sweep_values(lr=[self.lr], epochs=[self.epochs], wd=[self.wd], label_smoothing=[self.label_smoothing])
        check_head_shape(self.ps, self.xtra_fc)

    def dropouts(self) -> tuple[float, ...]:
        return tuple(_expand_ps(self.ps, len(self.xtra_fc) + 1))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["xtra_fc"] = list(self.xtra_fc)
        d["ps"] = list(self.ps) if isinstance(self.ps, tuple) else self.ps
        return d


def grid(lr: Sequence[float] = (1e-3, 3e-3, 1e-2), ps: Sequence = (None,), xtra_fc: Sequence = ((512,),),
         epochs: Sequence[int] = (5,), wd: Sequence[float] = (1e-2,),
         label_smoothing: Sequence[float] = (0.0,)) -> list[SweepConfig]:
    """Every combination, in a fixed order (lr varies fastest)."""
    return [SweepConfig(lr=l, ps=p, xtra_fc=tuple(x), epochs=e, wd=w, label_smoothing=s)
            for s, w, e, x, p, l in itertools.product(label_smoothing, wd, epochs, xtra_fc, ps, lr)]


def random_search(n: int, seed: int = 0, lr: tuple[float, float] = (1e-4, 3e-2), ps: Sequence = (None, 0.25, 0.5),
                  xtra_fc: Sequence = ((512,), (256,), ()), epochs: Sequence[int] = (3, 5),
                  wd: Sequence[float] = (0.0, 1e-3, 1e-2, 1e-1),
                  label_smoothing: Sequence[float] = (0.0, 0.1)) -> list[SweepConfig]:
    """``n`` configurations: lr log-uniform in the range, the others picked from their lists (seeded)."""
    rng = random.Random(seed)
    lo, hi = np.log10(lr[0]), np.log10(lr[1])
    return [SweepConfig(lr=float(10 ** rng.uniform(lo, hi)), ps=rng.choice(list(ps)), xtra_fc=tuple(rng.choice(list(xtra_fc))),
                       epochs=rng.choice(list(epochs)), wd=rng.choice(list(wd)),
                       label_smoothing=rng.choice(list(label_smoothing))) for _ in range(n)]


@dataclass(frozen=True)
class SweepRow:
    """One configuration's result: its last epoch's losses and accuracy, and its share of the time."""
    config: SweepConfig
    train_loss: float
    valid_loss: float
    valid_accuracy: float
    seconds: float

    def to_dict(self) -> dict:
        """The table's row: the config's columns (ps and xtra_fc as JSON text), then the results."""
        d = self.config.as_dict()
        return {"lr": d["lr"], "ps": "default" if d["ps"] is None else json.dumps(d["ps"]),
                "xtra_fc": json.dumps(d["xtra_fc"]), "epochs": d["epochs"], "wd": d["wd"],
                "label_smoothing": d["label_smoothing"], "train_loss": self.train_loss, "valid_loss": self.valid_loss,
                "valid_accuracy": self.valid_accuracy, "seconds": self.seconds}


@dataclass
class SweepResult:
    configs: list[SweepConfig]
    rows: list[SweepRow]                       # one per config, in the configs' order
    histories: list[list[dict]]                # per config: one row per epoch (as train.fit records it)
    state_dicts: list[dict] = field(repr=False)  # per config: the trained Head's state_dict
    seconds: float = 0.0
    batched: bool = True

    @property
    def table(self) -> pd.DataFrame:
        """One row per config: config columns, final losses, accuracy, seconds."""
        return pd.DataFrame([r.to_dict() for r in self.rows])

    @property
    def best_index(self) -> int:
        return best_index(self.table)

    @property
    def best(self) -> SweepConfig:
        return self.configs[self.best_index]


def best_index(table: pd.DataFrame) -> int:
    """The config with the highest valid accuracy; ties go to the lower valid loss, then the earlier config."""
    order = table.assign(_i=range(len(table))).sort_values(["valid_accuracy", "valid_loss", "_i"],
                                                           ascending=[False, True, True], kind="stable")
    return int(order["_i"].iloc[0])


# -- the stacked heads: torch.func over one module, torch's AdamW and OneCycleLR ----------------------

class _MaskDropout(nn.Module):
    """Dropout with its mask given (a buffer passed to ``functional_call``): each head's mask is drawn
    from its own generator, so the heads can share one vmapped forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask if self.training else x


def _new_head(cfg: SweepConfig, in_channels: int, n_classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # as the Learner builds the head for head_on_cache
    return build_head(in_channels, n_classes, cfg.ps, cfg.xtra_fc)


class _HeadStack:
    """M heads of one shape: per head its own parameters (one AdamW param group each, so its lr,
    beta1 and weight decay follow its own OneCycleLR), stacked each step for one ``vmap`` of
    ``functional_call`` over a stateless copy of the head; buffers (BatchNorm statistics) stacked."""

    def __init__(self, heads: Sequence[nn.Module], configs: Sequence[SweepConfig], seed: int):
        self.params = [{k: v.detach().clone().requires_grad_() for k, v in h.named_parameters()} for h in heads]
        self.buffers = {k: torch.stack([dict(h.named_buffers())[k] for h in heads]) for k, _ in heads[0].named_buffers()}
        self.base = copy.deepcopy(heads[0]).to("meta")
        self.drops = []  # (mask buffer name, rate per head)
        for i, m in enumerate(self.base.classifier):
            if isinstance(m, nn.Dropout):
                self.base.classifier[i] = _MaskDropout()
                self.drops.append((f"classifier.{i}.mask", [c.dropouts()[len(self.drops)] for c in configs]))
        self.gens = [torch.Generator().manual_seed(seed) for _ in heads]  # as nn.Dropout draws in fit, seeded so
        self.forward = torch.func.vmap(lambda p, b, x: torch.func.functional_call(self.base, (p, b), (x,)),
                                       in_dims=(0, 0, None))

    def __call__(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """x (B, ...) shared by every head -> scores (M, B, n_classes)."""
        self.base.train(train)
        stacked = {k: torch.stack([p[k] for p in self.params]) for k in self.params[0]}
        return self.forward(stacked, {**self.buffers, **(self._masks(x) if train else {})}, x)

    def _masks(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inverted-dropout masks, each head's from its own generator, in the order and shapes
        nn.Dropout draws them; a rate of 0 draws nothing, as in torch."""
        out, width = {}, x.shape[0]
        for block, (name, rates) in enumerate(self.drops):
            n = self.base.classifier[4 * block + 2].in_features
            masks = torch.ones(len(rates), width, n)
            for m, p in enumerate(rates):
                if p > 0:
                    masks[m].bernoulli_(1 - p, generator=self.gens[m]).div_(1 - p)
            out[name] = masks
        return out

    def state_dict(self, m: int) -> dict:
        """Head ``m``'s state under the key names of ``heads.Head``."""
        return {**{k: v.detach().clone() for k, v in self.params[m].items()},
                **{k: v[m].clone() for k, v in self.buffers.items()}}


def _train_group(configs: list[SweepConfig], train, valid, in_channels: int, n_classes: int, batch_size: int,
                 seed: int, on_epoch: Callable[[int, dict], None] | None, indices: list[int], task: Task):
    M, epochs = len(configs), configs[0].epochs
    model = _HeadStack([_new_head(c, in_channels, n_classes, seed) for c in configs], configs, seed)
    opt = torch.optim.AdamW([{"params": list(p.values()), "lr": c.lr, "weight_decay": c.wd}
                             for p, c in zip(model.params, configs)], foreach=True)
    sched = Schedule("one_cycle", epochs=epochs).build(opt, train.n_batches(batch_size))
    losses = [task.loss(c.label_smoothing) for c in configs]
    gen = torch.Generator().manual_seed(seed)
    histories: list[list[dict]] = [[] for _ in configs]
    for epoch in range(epochs):
        t0 = time.perf_counter()
        total, n = np.zeros(M), 0
        for x, y in train.batches(batch_size, gen):
            if len(x) < 2:  # as fit: a batch of one breaks BatchNorm1d in train mode
                continue
            out = model(x.float(), True)                                   # (M, B, C)
            per_model = [loss(out[m], y) for m, loss in enumerate(losses)]
            opt.zero_grad()
            torch.stack(per_model).sum().backward()
            opt.step()
            last_lr = [g["lr"] for g in opt.param_groups]
            sched.step()
            total += np.array([v.item() for v in per_model]) * len(x)
            n += len(x)
        valid_loss, valid_acc = _evaluate(model, valid, task)
        seconds = (time.perf_counter() - t0) / M  # the group's epoch, shared by its heads
        for m in range(M):
            row = {"epoch": epoch, "train_loss": float(total[m]) / max(n, 1), "valid_loss": float(valid_loss[m]),
                   "valid_accuracy": float(valid_acc[m]), "lr": last_lr[m], "seconds": seconds}
            histories[m].append(row)
            if on_epoch:
                on_epoch(indices[m], row)
    return histories, [model.state_dict(m) for m in range(M)]


@torch.no_grad()
def _evaluate(model: _HeadStack, valid, task: Task) -> tuple[np.ndarray, np.ndarray]:
    criterion, M = task.loss(), len(model.params)
    loss, correct, n = np.zeros(M), np.zeros(M), 0
    for x, y in valid.batches(512):
        out = model(x.float(), False)
        loss += np.array([criterion(out[m], y).item() for m in range(M)]) * len(y)
        correct += np.array([task.correct(out[m], y) for m in range(M)])
        n += len(y)
    return loss / max(n, 1), correct / max(n, 1)


def _shape(rows) -> int:
    for x, _ in rows.batches(2):
        return (concat_pool(x.float()) if x.ndim == 4 else x).shape[1]
    raise ConfigError("no cached rows to train on")


MAX_CHUNK_BYTES = 16 << 20  # per stacked weight tensor: glibc reuses freed blocks up to 32 MiB, larger ones are
                            # mapped afresh on each allocation (page faults on every step of a memory-bound loop)


def _chunks(idx: list[int], cfg: SweepConfig, in_channels: int, n_classes: int) -> list[list[int]]:
    sizes = [2 * in_channels, *cfg.xtra_fc, n_classes]
    largest = max(a * b for a, b in zip(sizes[:-1], sizes[1:])) * 4
    per = max(1, MAX_CHUNK_BYTES // largest)
    return [idx[i:i + per] for i in range(0, len(idx), per)]


def head_sweep(train: ArrayRows | StreamedRows, valid: ArrayRows | StreamedRows, n_classes: int,
               configs: Iterable[SweepConfig], batch_size: int = 64, seed: int = 0, batched: bool = True,
               on_epoch: Callable[[int, dict], None] | None = None, task: Task | None = None) -> SweepResult:
    """Train every config on the cached rows; ``on_epoch(config_index, row)`` after each epoch.

    batched: heads of one shape (xtra_fc, epochs) train together; False: one by one through
    ``fit_head_on_cache`` (the same numbers, slower).
    """
    configs = list(configs)
    if not configs:
        raise ConfigError("the sweep has no configurations")
    if len(train) < 2:
        raise ConfigError(f"{len(train)} training rows: a head needs at least 2 training images")
    multi_hot = np.asarray(train.y).ndim == 2
    task = task or (MultiLabel([str(i) for i in range(n_classes)]) if multi_hot else SINGLE_LABEL)
    if task.multilabel != multi_hot:
        raise ConfigError(f"the rows' targets are {'multi-hot' if multi_hot else 'class indices'}, the task is "
                          f"{task.kind}: pass the task the rows were read for (Task.from_manifest)")
    in_channels = _shape(train) // 2
    t0 = time.perf_counter()
    histories: list[list[dict]] = [[] for _ in configs]
    states: list[dict] = [{} for _ in configs]
    seconds = [0.0] * len(configs)
    if batched:
        groups: dict[tuple, list[int]] = {}
        for i, c in enumerate(configs):
            groups.setdefault((c.xtra_fc, c.epochs), []).append(i)
        chunks = [c for idx in groups.values() for c in _chunks(idx, configs[idx[0]], in_channels, n_classes)]
        for idx in chunks:
            g0 = time.perf_counter()
            hs, sds = _train_group([configs[i] for i in idx], train, valid, in_channels, n_classes, batch_size,
                                   seed, on_epoch, idx, task)
            for i, h, sd in zip(idx, hs, sds):
                histories[i], states[i], seconds[i] = h, sd, (time.perf_counter() - g0) / len(idx)
    else:
        for i, c in enumerate(configs):
            g0 = time.perf_counter()
            head = _new_head(c, in_channels, n_classes, seed)
            histories[i] = fit_head_on_cache(head, train, valid, lr=c.lr, batch_size=batch_size, seed=seed, wd=c.wd,
                                             schedule=Schedule("one_cycle", epochs=c.epochs),
                                             label_smoothing=c.label_smoothing, task=task,
                                             on_epoch=(lambda row, i=i: on_epoch(i, row)) if on_epoch else None)
            for row in histories[i]:
                row.pop("lr_steps", None)
            states[i] = {k: v.detach().clone() for k, v in head.state_dict().items()}
            seconds[i] = time.perf_counter() - g0
    return SweepResult(configs, sweep_rows(configs, histories, seconds), histories, states,
                       time.perf_counter() - t0, batched)


def sweep_entry(entry, manifest: pd.DataFrame, configs: Sequence[SweepConfig], batch_size: int = 64,
                seed: int = 0) -> tuple[SweepResult, list[str]]:
    """``head_sweep`` on a cache entry's rows of ``manifest`` (its train and valid splits; one class per
    image or several labels, as the manifest says). Returns (result, classes)."""
    task = Task.from_manifest(manifest)
    train = cached_rows(entry, manifest, task, "train", DEFAULT_MEMORY_BUDGET)
    valid = cached_rows(entry, manifest, task, "valid", DEFAULT_MEMORY_BUDGET)
    return head_sweep(train, valid, len(task.classes), configs, batch_size, seed, task=task), list(task.classes)


def sweep_rows(configs: Sequence[SweepConfig], histories: Sequence[list[dict]], seconds: Sequence[float]) -> list[SweepRow]:
    nan = float("nan")  # a config without an epoch (no validation rows) has no result
    return [SweepRow(c, (h[-1] if h else {}).get("train_loss", nan), (h[-1] if h else {}).get("valid_loss", nan),
                     (h[-1] if h else {}).get("valid_accuracy", nan), s) for c, h, s in zip(configs, histories, seconds)]


def head_from_result(result: SweepResult, index: int, n_classes: int) -> nn.Module:
    """Config ``index`` of the sweep as a trained ``heads.Head``."""
    c = result.configs[index]
    sd = result.state_dicts[index]
    in_channels = sd["classifier.0.weight"].shape[0] // 2
    head = build_head(in_channels, n_classes, c.ps, c.xtra_fc)
    head.load_state_dict(sd)
    return head.eval()


# -- reporting ------------------------------------------------------------------------------------------

def markdown_table(table: pd.DataFrame, best: int | None = None, limit: int = 50) -> str:
    """The table sorted best first, as Markdown (at most ``limit`` rows)."""
    order = table.assign(config=range(len(table))).sort_values(
        ["valid_accuracy", "valid_loss", "config"], ascending=[False, True, True], kind="stable").head(limit)
    cols = ["config", *CONFIG_COLUMNS, "train_loss", "valid_loss", "valid_accuracy", "seconds"]
    fmt = {"lr": "{:.2e}", "wd": "{:g}", "label_smoothing": "{:g}", "train_loss": "{:.4f}", "valid_loss": "{:.4f}",
           "valid_accuracy": "{:.4f}", "seconds": "{:.3f}"}
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in order.iterrows():
        cells = [fmt[c].format(r[c]) if c in fmt else str(r[c]) for c in cols]
        if best is not None and int(r["config"]) == best:
            cells[0] = f"**{cells[0]} (best)**"
        lines.append("| " + " | ".join(cells) + " |")
    if len(table) > limit:
        lines.append(f"\n({len(table) - limit} more configurations not shown)")
    return "\n".join(lines)


def plot_sweep(table: pd.DataFrame, path: str | Path) -> Path:
    """Valid accuracy and loss against lr, one colour per hidden-layer shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for shape, rows in table.groupby("xtra_fc", sort=True):
        for ax, col in zip(axes, ("valid_accuracy", "valid_loss")):
            ax.scatter(rows["lr"], rows[col], label=f"xtra_fc={shape}", alpha=0.7, s=18)
    b = best_index(table)
    for ax, col in zip(axes, ("valid_accuracy", "valid_loss")):
        ax.scatter([table["lr"].iloc[b]], [table[col].iloc[b]], marker="*", s=160, c="k", label="best")
        ax.set_xscale("log")
        ax.set_xlabel("lr")
        ax.set_ylabel(col)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"head sweep: {len(table)} configurations")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# -- reuse: the sweep is a pure function of its rows, configs, batch size and seed ----------------------

def sweep_fingerprint(view: str, configs: Sequence[SweepConfig], batch_size: int, seed: int) -> str:
    import hashlib

    payload = {"view": view, "configs": [c.as_dict() for c in configs], "batch_size": batch_size, "seed": seed,
               "code": SWEEP_CODE_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def save_sweep(entry, fingerprint: str, summary: dict) -> bool:
    """Keep the sweep's summary (JSON: table, histories, best config, run ids) beside the cache entry."""
    from precompute.store.results import ResultCache

    return ResultCache(entry).put(f"sweep-{fingerprint}.json", json.dumps(summary, default=float).encode())


def load_sweep(entry, fingerprint: str) -> dict | None:
    from precompute.store.results import ResultCache

    blob = ResultCache(entry).get(f"sweep-{fingerprint}.json")
    return json.loads(blob) if blob is not None else None


def summary(result: SweepResult) -> dict:
    """What is kept and returned: JSON data only (the trained weights are not kept: 100 heads are large)."""
    return {"configs": [c.as_dict() for c in result.configs], "table": result.table.to_dict("records"),
            "histories": result.histories, "best_index": result.best_index, "best": result.best.as_dict(),
            "seconds": result.seconds, "batched": result.batched}


def configs_from_summary(s: dict) -> list[SweepConfig]:
    return [SweepConfig(**{**c, "xtra_fc": tuple(c["xtra_fc"])}) for c in s["configs"]]


def head_on_cache_settings(summary_: dict, view_key: str) -> dict:
    """head_on_cache's config fields that train the sweep's best head again exactly as the sweep
    trained it (one_cycle, AdamW, its weight decay, label smoothing, batch size and seed), for
    ``from_sweep: true``. The sweep must have run on the same rows (``view_key``)."""
    if summary_.get("view_key") != view_key:
        raise ConfigError(f"from_sweep: the latest head_sweep ran on other rows (view {summary_.get('view_key')}) "
                          f"than these activations (view {view_key}): materialize head_sweep again first")
    if "batch_size" not in summary_ or "seed" not in summary_:
        raise ConfigError("from_sweep: this head_sweep result predates from_sweep (no batch size or seed kept): "
                          "materialize head_sweep again with reuse: false")
    best = SweepConfig(**{**summary_["best"], "xtra_fc": tuple(summary_["best"]["xtra_fc"])})
    return {"lr": best.lr, "ps": None if best.ps is None else list(best.dropouts()), "xtra_fc": list(best.xtra_fc),
            "epochs": best.epochs, "weight_decay": best.wd, "label_smoothing": best.label_smoothing,
            "schedule": "one_cycle", "optimizer": "adamw", "early_stopping_patience": None,
            "batch_size": int(summary_["batch_size"]), "seed": int(summary_["seed"]), "lr_from_finder": False,
            "custom_head": None}
