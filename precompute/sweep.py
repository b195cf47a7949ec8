"""Many heads on one cache: a grid or random search over lr, dropout, hidden sizes, epochs, weight
decay and label smoothing, trained in one process.

Heads of the same shape (``xtra_fc`` and ``epochs``) train together as one wide batched model:
their parameters are stacked along a leading "model" dimension, every linear layer is one
``torch.baddbmm`` and every BatchNorm one ``batch_norm`` call over ``models x features`` channels.
Each head keeps its own learning rate, weight decay, one-cycle schedule (lr and Adam's beta1, as
torch's ``OneCycleLR`` moves them), dropout rates and label smoothing; AdamW is applied per model.

The batched sweep computes what ``train.fit_head_on_cache`` computes for each configuration alone,
within float tolerance, dropout included:

- each head starts from ``torch.manual_seed(seed); build_head(...)``, as ``recipe`` builds a head;
- the batches come in the same order (one ``torch.Generator`` seeded with ``seed``);
- each head's dropout masks come from its own generator seeded with ``seed``, drawn in the order and
  the shapes ``nn.Dropout`` draws them from the global generator in ``fit`` (which seeds it with
  ``seed``); a rate of 0 draws nothing, as in torch;
- the first BatchNorm sees the same rows in every head, so its statistics are computed once.

``head_sweep(..., batched=False)`` trains the same configurations one by one through
``fit_head_on_cache``: the reference the tests and ``benchmarks/head_sweep.py`` compare against.
Single-label heads of fastai's shape only (no custom head, no multi-label targets).
"""

from __future__ import annotations

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
from precompute.train import ArrayRows, ConfigError, Schedule, StreamedRows, fit_head_on_cache
from precompute.versions import SWEEP_CODE_VERSION

CONFIG_COLUMNS = ["lr", "ps", "xtra_fc", "epochs", "wd", "label_smoothing"]


@dataclass(frozen=True)
class HeadConfig:
    """One head to train: ``ps`` None is fastai's 0.25 ... 0.5; a float is one rate for every block."""

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
        if not self.lr > 0 or self.epochs < 1 or self.wd < 0 or not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"head config {self}: needs lr > 0, epochs >= 1, wd >= 0, 0 <= label_smoothing < 1")
        try:
            drops = self.dropouts()
        except ValueError as exc:
            raise ConfigError(f"head config {self}: {exc}") from None
        if any(not 0 <= p < 1 for p in drops):
            raise ConfigError(f"head config {self}: dropout rates must be in [0, 1)")

    def dropouts(self) -> tuple[float, ...]:
        return tuple(_expand_ps(self.ps, len(self.xtra_fc) + 1))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["xtra_fc"] = list(self.xtra_fc)
        d["ps"] = list(self.ps) if isinstance(self.ps, tuple) else self.ps
        return d


def grid(lr: Sequence[float] = (1e-3, 3e-3, 1e-2), ps: Sequence = (None,), xtra_fc: Sequence = ((512,),),
         epochs: Sequence[int] = (5,), wd: Sequence[float] = (1e-2,),
         label_smoothing: Sequence[float] = (0.0,)) -> list[HeadConfig]:
    """Every combination, in a fixed order (lr varies fastest)."""
    return [HeadConfig(lr=l, ps=p, xtra_fc=tuple(x), epochs=e, wd=w, label_smoothing=s)
            for s, w, e, x, p, l in itertools.product(label_smoothing, wd, epochs, xtra_fc, ps, lr)]


def random_search(n: int, seed: int = 0, lr: tuple[float, float] = (1e-4, 3e-2), ps: Sequence = (None, 0.25, 0.5),
                  xtra_fc: Sequence = ((512,), (256,), ()), epochs: Sequence[int] = (3, 5),
                  wd: Sequence[float] = (0.0, 1e-3, 1e-2, 1e-1),
                  label_smoothing: Sequence[float] = (0.0, 0.1)) -> list[HeadConfig]:
    """``n`` configurations: lr log-uniform in the range, the others picked from their lists (seeded)."""
    rng = random.Random(seed)
    lo, hi = np.log10(lr[0]), np.log10(lr[1])
    return [HeadConfig(lr=float(10 ** rng.uniform(lo, hi)), ps=rng.choice(list(ps)), xtra_fc=tuple(rng.choice(list(xtra_fc))),
                       epochs=rng.choice(list(epochs)), wd=rng.choice(list(wd)),
                       label_smoothing=rng.choice(list(label_smoothing))) for _ in range(n)]


@dataclass
class SweepResult:
    configs: list[HeadConfig]
    table: pd.DataFrame                        # one row per config: config columns, final losses, accuracy, seconds
    histories: list[list[dict]]                # per config: one row per epoch (as train.fit records it)
    state_dicts: list[dict] = field(repr=False)  # per config: the trained Head's state_dict
    seconds: float = 0.0
    batched: bool = True

    @property
    def best_index(self) -> int:
        return best_index(self.table)

    @property
    def best(self) -> HeadConfig:
        return self.configs[self.best_index]


def best_index(table: pd.DataFrame) -> int:
    """The config with the highest valid accuracy; ties go to the lower valid loss, then the earlier config."""
    order = table.assign(_i=range(len(table))).sort_values(["valid_accuracy", "valid_loss", "_i"],
                                                           ascending=[False, True, True], kind="stable")
    return int(order["_i"].iloc[0])


# -- schedules: what torch's scheduler does to one optimizer, step by step --------------------------

def _schedule_trace(cfg: HeadConfig, steps_per_epoch: int) -> tuple[list[float], list[float]]:
    """(lr, beta1) in force at each optimizer step of ``fit`` for this config (one_cycle, as
    fit_head_on_cache runs it): replayed on a dummy AdamW so it is torch's own schedule."""
    schedule = Schedule("one_cycle", epochs=cfg.epochs)
    dummy = torch.zeros(1, requires_grad=True)
    opt = torch.optim.AdamW([dummy], lr=cfg.lr, weight_decay=cfg.wd)
    sched = schedule.build(opt, steps_per_epoch)
    lrs, betas = [], []
    for _ in range(max(1, steps_per_epoch) * schedule.total_epochs):
        lrs.append(opt.param_groups[0]["lr"])
        betas.append(opt.param_groups[0]["betas"][0])
        opt.step()  # keeps torch from warning that the scheduler stepped first (no grad: a no-op)
        sched.step()
    return lrs, betas


# -- the batched model ----------------------------------------------------------------------------------

class _Stacked:
    """M heads of one shape as stacked tensors: per block BN (weight, bias, running stats) + Linear."""

    def __init__(self, heads: Sequence[nn.Module], dropouts: list[tuple[float, ...]]):
        seqs = [list(h.classifier) for h in heads]
        self.n_blocks = len(dropouts[0])
        self.bn_w, self.bn_b, self.rm, self.rv, self.lin_w, self.lin_b = [], [], [], [], [], []
        for i in range(self.n_blocks):
            bns = [s[4 * i] for s in seqs]
            lins = [s[4 * i + 2] for s in seqs]
            self.bn_w.append(torch.stack([b.weight.detach() for b in bns]).requires_grad_())
            self.bn_b.append(torch.stack([b.bias.detach() for b in bns]).requires_grad_())
            if i == 0:  # every head sees the same rows: one set of running statistics
                self.rm.append(bns[0].running_mean.clone())
                self.rv.append(bns[0].running_var.clone())
            else:
                self.rm.append(torch.stack([b.running_mean for b in bns]).contiguous())
                self.rv.append(torch.stack([b.running_var for b in bns]).contiguous())
            self.lin_w.append(torch.stack([l.weight.detach().transpose(0, 1) for l in lins]).contiguous().requires_grad_())
            self.lin_b.append(torch.stack([l.bias.detach() for l in lins]).unsqueeze(1).contiguous().requires_grad_())
        self.eps = [b.eps for b in [seqs[0][4 * i] for i in range(self.n_blocks)]]
        self.momentum = [b.momentum for b in [seqs[0][4 * i] for i in range(self.n_blocks)]]
        self.p = torch.tensor(dropouts, dtype=torch.float32)  # (M, n_blocks)
        self.n_models = len(heads)
        self.batches_tracked = 0
        self._mask_buffers: dict[tuple, torch.Tensor] = {}

    def params(self) -> list[torch.Tensor]:
        return [t for i in range(self.n_blocks) for t in (self.bn_w[i], self.bn_b[i], self.lin_w[i], self.lin_b[i])]

    def forward(self, x: torch.Tensor, train: bool, gens: list[torch.Generator | None] | None = None) -> torch.Tensor:
        """x (B, F) shared by every head -> scores (M, B, n_classes)."""
        M = self.n_models
        h = x
        for i in range(self.n_blocks):
            if i == 0:
                xhat = nn.functional.batch_norm(x, self.rm[0], self.rv[0], None, None, train, self.momentum[0], self.eps[0])
                h = torch.addcmul(self.bn_b[0].unsqueeze(1), xhat.unsqueeze(0), self.bn_w[0].unsqueeze(1))
            else:
                B, n = h.shape[1], h.shape[2]
                flat = h.transpose(0, 1).reshape(B, M * n)
                flat = nn.functional.batch_norm(flat, self.rm[i].view(-1), self.rv[i].view(-1), self.bn_w[i].reshape(-1),
                                                self.bn_b[i].reshape(-1), train, self.momentum[i], self.eps[i])
                h = flat.reshape(B, M, n).transpose(0, 1)
            if train:
                h = h * self._masks(i, h.shape[1:], gens)
            h = torch.baddbmm(self.lin_b[i], h, self.lin_w[i])
            if i < self.n_blocks - 1:
                h = torch.relu(h)
        if train:
            self.batches_tracked += 1
        return h

    def _masks(self, block: int, shape, gens) -> torch.Tensor:
        """Inverted-dropout masks, each head's from its own generator, as nn.Dropout draws them."""
        p = self.p[:, block]
        if not (p > 0).any():
            return torch.ones(1)
        key = (block, *shape)
        if key not in self._mask_buffers:  # rows of heads without dropout stay 1
            self._mask_buffers[key] = torch.ones((self.n_models, *shape))
        masks = self._mask_buffers[key]
        for m in torch.nonzero(p > 0).flatten().tolist():
            keep = 1.0 - float(p[m])
            masks[m].bernoulli_(keep, generator=gens[m]).div_(keep)
        return masks

    def state_dict(self, m: int) -> dict:
        """Model ``m``'s parameters under the key names of ``heads.Head``."""
        out = {}
        for i in range(self.n_blocks):
            bn, lin = f"classifier.{4 * i}", f"classifier.{4 * i + 2}"
            out[f"{bn}.weight"] = self.bn_w[i][m].detach().clone()
            out[f"{bn}.bias"] = self.bn_b[i][m].detach().clone()
            out[f"{bn}.running_mean"] = (self.rm[i] if i == 0 else self.rm[i][m]).clone()
            out[f"{bn}.running_var"] = (self.rv[i] if i == 0 else self.rv[i][m]).clone()
            out[f"{bn}.num_batches_tracked"] = torch.tensor(self.batches_tracked)
            out[f"{lin}.weight"] = self.lin_w[i][m].detach().transpose(0, 1).clone()
            out[f"{lin}.bias"] = self.lin_b[i][m, 0].detach().clone()
        return out


def _pooled(x: torch.Tensor) -> torch.Tensor:
    return concat_pool(x) if x.ndim == 4 else x


def _new_head(cfg: HeadConfig, in_channels: int, n_classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # as recipe builds the head for head_on_cache
    return build_head(in_channels, n_classes, cfg.ps, cfg.xtra_fc)


def _adamw_step(params, exp_avg, exp_avg_sq, buffers, step: int, lr: torch.Tensor, beta1: torch.Tensor,
                wd: torch.Tensor, beta2: float = 0.999, eps: float = 1e-8) -> None:
    """torch's AdamW (single-tensor path), with lr, beta1 and weight decay per model (dim 0, float64);
    in place, in preallocated buffers: the update is memory-bound, a fresh tensor costs page faults."""
    decay, b1 = (1 - lr * wd).float(), beta1.float()
    step_size = (lr / (1 - beta1 ** step)).float()
    bc2_sqrt = (1 - beta2 ** step) ** 0.5
    for p, m, v, buf in zip(params, exp_avg, exp_avg_sq, buffers):
        g, shape = p.grad, (-1,) + (1,) * (p.ndim - 1)
        p.mul_(decay.view(shape))
        m.lerp_(g, (1 - b1).view(shape))
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        torch.sqrt(v, out=buf)
        buf.div_(bc2_sqrt).add_(eps).div_(step_size.view(shape))
        p.addcdiv_(m, buf, value=-1.0)


def _train_group(configs: list[HeadConfig], train, valid, in_channels: int, n_classes: int, batch_size: int,
                 seed: int, on_epoch: Callable[[int, dict], None] | None, indices: list[int]):
    M, epochs = len(configs), configs[0].epochs
    model = _Stacked([_new_head(c, in_channels, n_classes, seed) for c in configs], [c.dropouts() for c in configs])
    steps_per_epoch = train.n_batches(batch_size)
    traces = [_schedule_trace(c, steps_per_epoch) for c in configs]
    lr_steps = torch.tensor([t[0] for t in traces], dtype=torch.float64)     # (M, steps)
    beta_steps = torch.tensor([t[1] for t in traces], dtype=torch.float64)
    wd = torch.tensor([c.wd for c in configs], dtype=torch.float64)
    smooth = torch.tensor([c.label_smoothing for c in configs]).view(M, 1)
    params = model.params()
    exp_avg = [torch.zeros_like(p) for p in params]
    exp_avg_sq = [torch.zeros_like(p) for p in params]
    buffers = [torch.empty_like(p) for p in params]
    gen = torch.Generator().manual_seed(seed)
    drop_gens = [torch.Generator().manual_seed(seed) if any(p > 0 for p in c.dropouts()) else None for c in configs]
    histories: list[list[dict]] = [[] for _ in configs]
    step = 0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        total, n, last_lr = torch.zeros(M, dtype=torch.float64), 0, [0.0] * M
        for x, y in train.batches(batch_size, gen):
            if len(x) < 2:  # as fit: a batch of one breaks BatchNorm1d in train mode
                continue
            x, y = _pooled(x.float()), y.long()
            out = model.forward(x, True, drop_gens)                    # (M, B, C)
            logp = torch.log_softmax(out, -1)
            nll = -logp.gather(-1, y.view(1, -1, 1).expand(M, -1, 1)).squeeze(-1)
            per_model = ((1 - smooth) * nll + smooth * -logp.mean(-1)).mean(1)  # cross_entropy(label_smoothing)
            for p in params:
                p.grad = None
            per_model.sum().backward()
            lr_t, b1_t = lr_steps[:, step], beta_steps[:, step]
            step += 1
            with torch.no_grad():
                _adamw_step(params, exp_avg, exp_avg_sq, buffers, step, lr_t, b1_t, wd)
            last_lr = lr_t.tolist()
            total += per_model.detach().double() * len(x)
            n += len(x)
        valid_loss, valid_acc = _evaluate(model, valid)
        seconds = (time.perf_counter() - t0) / M  # the group's epoch, shared by its heads
        for m in range(M):
            row = {"epoch": epoch, "train_loss": float(total[m]) / max(n, 1), "valid_loss": float(valid_loss[m]),
                   "valid_accuracy": float(valid_acc[m]), "lr": last_lr[m], "seconds": seconds}
            histories[m].append(row)
            if on_epoch:
                on_epoch(indices[m], row)
    return histories, [model.state_dict(m) for m in range(M)]


@torch.no_grad()
def _evaluate(model: _Stacked, valid) -> tuple[np.ndarray, np.ndarray]:
    M = model.n_models
    loss, correct, n = torch.zeros(M, dtype=torch.float64), torch.zeros(M, dtype=torch.float64), 0
    for x, y in valid.batches(512):
        x, y = _pooled(x.float()), y.long()
        out = model.forward(x, False)
        nll = -torch.log_softmax(out, -1).gather(-1, y.view(1, -1, 1).expand(M, -1, 1)).squeeze(-1)
        loss += nll.double().mean(1) * len(y)
        correct += (out.argmax(-1) == y).double().sum(1)
        n += len(y)
    return (loss / max(n, 1)).numpy(), (correct / max(n, 1)).numpy()


def _shape(rows) -> int:
    for x, _ in rows.batches(2):
        return _pooled(x.float()).shape[1]
    raise ConfigError("no cached rows to train on")


MAX_CHUNK_BYTES = 16 << 20  # per stacked weight tensor: glibc reuses freed blocks up to 32 MiB, larger ones are
                            # mapped afresh on each allocation (page faults on every step of a memory-bound loop)


def _chunks(idx: list[int], cfg: HeadConfig, in_channels: int, n_classes: int) -> list[list[int]]:
    sizes = [2 * in_channels, *cfg.xtra_fc, n_classes]
    largest = max(a * b for a, b in zip(sizes[:-1], sizes[1:])) * 4
    per = max(1, MAX_CHUNK_BYTES // largest)
    return [idx[i:i + per] for i in range(0, len(idx), per)]


def head_sweep(train: ArrayRows | StreamedRows, valid: ArrayRows | StreamedRows, n_classes: int,
               configs: Iterable[HeadConfig], batch_size: int = 64, seed: int = 0, batched: bool = True,
               on_epoch: Callable[[int, dict], None] | None = None) -> SweepResult:
    """Train every config on the cached rows; ``on_epoch(config_index, row)`` after each epoch.

    batched: heads of one shape (xtra_fc, epochs) train together; False: one by one through
    ``fit_head_on_cache`` (the same numbers, slower).
    """
    configs = list(configs)
    if not configs:
        raise ConfigError("the sweep has no configurations")
    if len(train) < 2:
        raise ConfigError(f"{len(train)} training rows: a head needs at least 2 training images")
    if np.asarray(train.y).ndim != 1:
        raise ConfigError("the head sweep trains single-label heads; this manifest is multi-label")
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
                                   seed, on_epoch, idx)
            for i, h, sd in zip(idx, hs, sds):
                histories[i], states[i], seconds[i] = h, sd, (time.perf_counter() - g0) / len(idx)
    else:
        for i, c in enumerate(configs):
            g0 = time.perf_counter()
            head = _new_head(c, in_channels, n_classes, seed)
            histories[i] = fit_head_on_cache(head, train, valid, lr=c.lr, batch_size=batch_size, seed=seed, wd=c.wd,
                                             schedule=Schedule("one_cycle", epochs=c.epochs),
                                             label_smoothing=c.label_smoothing,
                                             on_epoch=(lambda row, i=i: on_epoch(i, row)) if on_epoch else None)
            for row in histories[i]:
                row.pop("lr_steps", None)
            states[i] = {k: v.detach().clone() for k, v in head.state_dict().items()}
            seconds[i] = time.perf_counter() - g0
    return SweepResult(configs, sweep_table(configs, histories, seconds), histories, states,
                       time.perf_counter() - t0, batched)


def sweep_table(configs: Sequence[HeadConfig], histories: Sequence[list[dict]], seconds: Sequence[float]) -> pd.DataFrame:
    rows = []
    for c, h, s in zip(configs, histories, seconds):
        d = c.as_dict()
        last = h[-1] if h else {}
        rows.append({"lr": d["lr"], "ps": "default" if d["ps"] is None else json.dumps(d["ps"]), "xtra_fc": json.dumps(d["xtra_fc"]), "epochs": d["epochs"],
                     "wd": d["wd"], "label_smoothing": d["label_smoothing"],
                     "train_loss": last.get("train_loss", float("nan")), "valid_loss": last.get("valid_loss", float("nan")),
                     "valid_accuracy": last.get("valid_accuracy", float("nan")), "seconds": s})
    return pd.DataFrame(rows)


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

def sweep_fingerprint(view: str, configs: Sequence[HeadConfig], batch_size: int, seed: int) -> str:
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


def configs_from_summary(s: dict) -> list[HeadConfig]:
    return [HeadConfig(**{**c, "xtra_fc": tuple(c["xtra_fc"])}) for c in s["configs"]]


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
    best = HeadConfig(**{**summary_["best"], "xtra_fc": tuple(summary_["best"]["xtra_fc"])})
    return {"lr": best.lr, "ps": None if best.ps is None else list(best.dropouts()), "xtra_fc": list(best.xtra_fc),
            "epochs": best.epochs, "weight_decay": best.wd, "label_smoothing": best.label_smoothing,
            "schedule": "one_cycle", "optimizer": "adamw", "early_stopping_patience": None,
            "batch_size": int(summary_["batch_size"]), "seed": int(summary_["seed"]), "lr_from_finder": False,
            "custom_head": None}
