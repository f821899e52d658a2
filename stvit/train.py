"""Train STViT on an image folder or a generated set, on one process or many (``torchrun``, DDP).

One process (CPU or one GPU)::

    python -m stvit.train --synthetic --model stvit_small --img-size 64 --epochs 2 --out runs/synthetic
    python -m stvit.train --data /data/imagenet --model stvit_small --out runs/stvit_s

Several processes, one per GPU (NCCL), or on CPUs (gloo)::

    torchrun --standalone --nproc_per_node 8 -m stvit.train --data /data/imagenet --out runs/s

The recipe is DeiT-style: AdamW without weight decay on norms and biases, a linear warm-up then a
cosine decay of the learning rate (per step), label smoothing, stochastic depth, bf16 autocast on
GPUs, optional ``torch.compile``. ``--batch-size`` is per process; the
global batch is ``batch size x processes``. Defaults are DeiT-style ImageNet settings (300
epochs, lr 1e-3 at a global batch of 1024, weight decay 0.05, 5 warm-up epochs, smoothing 0.1);
scale ``--lr`` with the global batch. Not included: mixup / cutmix, RandAugment, random erasing,
repeated augmentation and EMA weights, which full DeiT-style recipes add on top.

Under ``torchrun`` every process trains a shard of each global batch (``DistributedSampler``) and
``DistributedDataParallel`` averages the gradients; losses and accuracies are all-reduced, and rank 0
alone prints, writes the logs and writes the checkpoints. BatchNorm statistics are per process
(``--sync-bn`` on GPUs makes them global).

Outputs in ``--out``: ``last.pt`` (every epoch), ``best.pt`` (best validation top-1) and, with
``--save-every N``, ``epoch_N.pt``, each with the model, optimiser, scheduler, epoch, step and the
RNG states of every process, so that ``--resume`` continues bit for bit (same number of processes
and settings); ``log.json`` (one record per epoch:
train/val loss and top-1) and ``steps.jsonl`` (the train loss every ``--log-every`` steps).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .data import ImageFolder, SyntheticImages, check_img_size
from .model import (CheckpointMismatchError, STViT, load_official_checkpoint, stvit_base,
                    stvit_large, stvit_small)

__all__ = ["MODELS", "build_model", "main", "parse_args", "setup_distributed", "DistEnv",
           "make_datasets", "make_loader", "param_groups", "warmup_cosine", "load_training_checkpoint"]

#: The architectures ``--model`` accepts.
MODELS: Dict[str, Callable[..., STViT]] = {
    "stvit_small": stvit_small, "stvit_base": stvit_base, "stvit_large": stvit_large,
}

CHECKPOINT_FORMAT = "stvit.train/1"


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------

@dataclass
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size`` (1 without torchrun) and its device."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto", dist_backend: str = "auto") -> DistEnv:
    """Read torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and, with more than one
    process, initialise the default process group: NCCL on GPUs, gloo on CPUs (``dist_backend``
    overrides). ``device`` is ``auto`` (GPU ``LOCAL_RANK`` if there is a GPU), ``cpu`` or ``cuda``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA GPU")
        dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    if world > 1 and not dist.is_initialized():
        backend = dist_backend if dist_backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, **({"device_id": dev} if dev.type == "cuda" else {}))
    return DistEnv(rank, world, local, dev, world > 1)


def _all_reduce_sum(values: Sequence[float], env: DistEnv) -> List[float]:
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=env.device)
    if env.distributed:
        dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

class ShardSampler(Sampler):
    """Every ``world_size``-th index from ``rank``: each sample exactly once over all processes (for
    evaluation, where ``DistributedSampler`` would repeat samples to even the shards out)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_datasets(args: argparse.Namespace):
    """``(train set, validation set, class count)`` from ``--data`` or ``--synthetic``."""
    check_img_size(args.img_size)
    if args.synthetic:
        n_cls = args.num_classes or 10
        train = SyntheticImages(args.synthetic_size, n_cls, args.img_size, seed=args.seed, split=0)
        val = SyntheticImages(max(1, args.synthetic_size // 4), n_cls, args.img_size, seed=args.seed, split=1)
        return train, val, n_cls
    root = args.data
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder {root!r} does not exist; expected "
                                f"{root}/train/<class>/<images> and {root}/val/<class>/<images> "
                                f"(or use --synthetic)")
    tdir, vdir = os.path.join(root, "train"), os.path.join(root, "val")
    for d in (tdir, vdir):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"data folder {root!r} has no {os.path.basename(d)!r} sub-folder; "
                                    f"expected {root}/train/<class>/<images> and "
                                    f"{root}/val/<class>/<images>")
    train = ImageFolder(tdir, args.img_size, train=True, seed=args.seed)
    val = ImageFolder(vdir, args.img_size, train=False, classes=train.classes)
    if args.num_classes and args.num_classes != train.num_classes:
        raise ValueError(f"--num-classes {args.num_classes}, but {tdir!r} has {train.num_classes} classes")
    return train, val, train.num_classes


def make_loader(dataset: Dataset, env: DistEnv, batch_size: int, train: bool, seed: int,
                workers: int) -> DataLoader:
    """A loader over this process's shard: for training a ``DistributedSampler`` (shuffled by
    ``seed`` + epoch; full batches only), for evaluation a :class:`ShardSampler`."""
    if train:
        sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                     seed=seed, drop_last=True)
    else:
        sampler = ShardSampler(len(dataset), env.rank, env.world_size)
    # The loader's own generator (worker seeds) is separate from the global RNG, so that creating
    # an iterator does not consume the global RNG that drop-path draws from.
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=train, pin_memory=env.device.type == "cuda", generator=g,
                      persistent_workers=False)


# ----------------------------------------------------------------------------------------------
# Model, optimiser, schedule
# ----------------------------------------------------------------------------------------------

def build_model(name: str, num_classes: int, model_kwargs: Optional[Dict[str, Any]] = None,
                **overrides) -> STViT:
    """``MODELS[name](num_classes=..., **model_kwargs, **overrides)`` with a clear error for an
    unknown name. ``model_kwargs`` changes the architecture (saved in checkpoints);
    ``overrides`` are run settings (``drop_path_rate``, ``backend``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes, **(model_kwargs or {}), **overrides)


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Two AdamW groups: weight decay on the weight matrices and kernels, none on 1-D parameters
    (norm scales, biases) and layer scales."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or "gamma_" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float,
                  warmup_lr: float) -> float:
    """The learning rate at ``step``: linear from ``warmup_lr`` to ``base_lr`` over ``warmup_steps``,
    then a cosine from ``base_lr`` to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

def _model_desc(cfg: Dict[str, Any]) -> str:
    kw = f", model_kwargs={cfg.get('model_kwargs')}" if cfg.get("model_kwargs") else ""
    return f"{cfg.get('model')} with {cfg.get('num_classes')} classes{kw}"


def load_training_checkpoint(path: str, expect: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Read a ``stvit.train`` checkpoint (``weights_only``). With ``expect`` (``model``,
    ``num_classes``, ``model_kwargs``), a checkpoint of another model raises
    :class:`~stvit.CheckpointMismatchError` naming both."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(
            f"{path!r} is not a stvit.train checkpoint (no format {CHECKPOINT_FORMAT!r}): it cannot be "
            f"resumed; to start from its weights use --pretrained {path}")
    if expect is not None:
        got = ckpt["config"]
        keys = ("model", "num_classes", "model_kwargs")
        if any((got.get(k) or None) != (expect.get(k) or None) for k in keys):
            raise CheckpointMismatchError(
                f"checkpoint {path!r} is of another model: it holds {_model_desc(got)}, but this run "
                f"builds {_model_desc(expect)}; pass the matching --model / --num-classes / "
                f"--model-kwargs, or start without --resume")
    return ckpt


def _save_atomic(obj: Any, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state() -> Dict[str, Any]:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python": random.getstate()}


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])


def _gather_rng(env: DistEnv) -> List[Dict[str, Any]]:
    mine = _rng_state()
    if not env.distributed:
        return [mine]
    out: List[Any] = [None] * env.world_size
    dist.all_gather_object(out, mine)
    return out


def load_pretrained(model: STViT, path: str) -> List[str]:
    """Load weights for fine-tuning from an official checkpoint or a ``stvit.train`` checkpoint; a head
    of another class count is left as initialised. Returns the re-initialised keys; any other
    mismatch raises :class:`~stvit.CheckpointMismatchError`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    res = load_official_checkpoint(model, path, strict=False)
    head = [k for k, _, _ in res.mismatched_keys if k.startswith("head.")]
    bad_missing = [k for k in res.missing_keys if not k.startswith("head.")]
    bad_shapes = [m for m in res.mismatched_keys if not m[0].startswith("head.")]
    if bad_missing or res.unexpected_keys or bad_shapes:
        def short(items):
            s = ", ".join(items[:5])
            return (s + (f", ... ({len(items)} in all)" if len(items) > 5 else "")) or "none"
        shapes = [f"{k} (checkpoint {list(a)} vs model {list(b)})" for k, a, b in bad_shapes]
        raise CheckpointMismatchError(
            f"{path!r} is a checkpoint of another model than this STViT (dims {model.embed_dim}, "
            f"depths {[len(l.blocks) for l in model.layers]}): missing keys: {short(bad_missing)}; "
            f"unexpected keys: {short(res.unexpected_keys)}; shape mismatches: {short(shapes)}. "
            f"Pass the --model (and --model-kwargs) it was trained as")
    return head


# ----------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------

class Progress:
    """A progress bar on rank 0: one redrawn line on a terminal, else a line every 10% of the
    epoch."""

    def __init__(self, total: int, desc: str, enabled: bool, stream=None):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = self.last = time.perf_counter()
        self.every = max(1, total // 10)
        self.info = ""

    def update(self, n: int, info: Optional[str] = None) -> None:
        """Show ``n`` of ``total`` done; ``info`` (e.g. the loss) stays shown until replaced."""
        if not self.enabled:
            return
        if info is not None:
            self.info = info
        now = time.perf_counter()
        if self.tty and now - self.last < 0.2 and n < self.total:
            return
        if not self.tty and n % self.every and n != self.total:
            return
        self.last = now
        width = 24
        done = int(width * n / max(1, self.total))
        rate = n / max(now - self.t0, 1e-9)
        line = (f"{self.desc} [{'#' * done}{'.' * (width - done)}] {n}/{self.total} "
                f"{rate:.2f} it/s {self.info}")
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def _autocast(args, env: DistEnv):
    if args.precision == "bf16":
        return torch.autocast(env.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_one_epoch(model, loader, criterion, optimizer, scheduler, env: DistEnv, args, epoch: int,
                    step: int, step_log) -> Dict[str, float]:
    model.train()
    progress = Progress(len(loader), f"epoch {epoch + 1}/{args.epochs}",
                        env.is_main and not args.no_progress)
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    correct = torch.zeros((), dtype=torch.float64, device=env.device)
    seen = 0
    win_loss, win_n = torch.zeros((), dtype=torch.float64, device=env.device), 0
    for i, (x, y) in enumerate(loader):
        x = x.to(env.device, non_blocking=True)
        y = y.to(env.device, non_blocking=True)
        with _autocast(args, env):
            out = model(x)
            loss = criterion(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        optimizer.step()
        scheduler.step()
        step += 1
        with torch.no_grad():
            d = loss.detach().double()
            loss_sum += d * y.numel()
            win_loss += d
            win_n += 1
            correct += (out.argmax(1) == y).sum()
        seen += y.numel()
        if step % args.log_every == 0 or i + 1 == len(loader):
            total, n = _all_reduce_sum([win_loss.item(), win_n], env)
            mean = total / n
            if not math.isfinite(mean):
                raise FloatingPointError(f"the training loss is {mean} at step {step} (epoch {epoch + 1}); "
                                         f"lower --lr or use --clip-grad")
            lr = optimizer.param_groups[0]["lr"]
            step_log({"step": step, "epoch": epoch + 1, "loss": mean, "lr": lr})
            progress.update(i + 1, f"loss {mean:.4f} lr {lr:.3g}")
            win_loss.zero_()
            win_n = 0
        else:
            progress.update(i + 1)
    progress.close()
    total_loss, total_correct, total_seen = _all_reduce_sum([loss_sum.item(), correct.item(), seen], env)
    return {"train_loss": total_loss / total_seen, "train_top1": 100.0 * total_correct / total_seen,
            "step": step}


@torch.no_grad()
def evaluate(model, loader, env: DistEnv, args) -> Dict[str, float]:
    model.eval()
    ce = nn.CrossEntropyLoss(reduction="sum")
    loss = correct1 = correct5 = seen = 0.0
    for x, y in loader:
        x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
        with _autocast(args, env):
            out = model(x).float()
        loss += ce(out, y).item()
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(1).sum().item()
        seen += y.numel()
    loss, correct1, correct5, seen = _all_reduce_sum([loss, correct1, correct5, seen], env)
    if seen == 0:
        return {}
    return {"val_loss": loss / seen, "val_top1": 100.0 * correct1 / seen, "val_top5": 100.0 * correct5 / seen}


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m stvit.train",
        description="Train STViT on an ImageFolder-layout folder or a synthetic set; under torchrun, "
                    "with DistributedDataParallel.")
    d = p.add_argument_group("data")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR",
                     help="folder with train/<class>/<images> and val/<class>/<images>")
    src.add_argument("--synthetic", action="store_true", help="a generated set (smoke test of the pipeline)")
    d.add_argument("--synthetic-size", type=int, default=256,
                   help="training images of --synthetic (val: a quarter)")
    d.add_argument("--num-classes", type=int, default=None,
                   help="classes (default: the data's; 10 for --synthetic)")
    d.add_argument("--img-size", type=int, default=224, help="input side, a multiple of 32")
    d.add_argument("--workers", type=int, default=None, help="loader workers per process "
                   "(default: 0 for --synthetic, else min(8, CPUs / processes))")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="stvit_small", choices=sorted(MODELS))
    m.add_argument("--model-kwargs", type=json.loads, default=None, metavar="JSON",
                   help='architecture overrides passed to the model, e.g. \'{"depths": [1, 1, 1, 1]}\'')
    m.add_argument("--backend", default="auto",
                   help="stvit_kernels backend: auto, reference, cpu, cuda, triton")
    m.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate")
    m.add_argument("--pretrained", metavar="CKPT",
                   help="start from these weights (official or stvit.train checkpoint)")
    m.add_argument("--compile", action="store_true", help="torch.compile the model")
    m.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    m.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (GPUs only)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=300)
    o.add_argument("--batch-size", type=int, default=128, help="per process")
    o.add_argument("--lr", type=float, default=1e-3,
                   help="peak learning rate (1e-3 for a global batch of 1024)")
    o.add_argument("--min-lr", type=float, default=1e-5)
    o.add_argument("--warmup-lr", type=float, default=1e-6)
    o.add_argument("--warmup-epochs", type=float, default=5)
    o.add_argument("--weight-decay", type=float, default=0.05)
    o.add_argument("--label-smoothing", type=float, default=0.1)
    o.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this")
    o.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on GPUs, fp32 on CPUs")
    o.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("run")
    r.add_argument("--out", default="runs/stvit", help="folder for checkpoints and logs")
    r.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="also keep OUT/epoch_N.pt every N epochs (0: only last.pt and best.pt)")
    r.add_argument("--resume", metavar="CKPT",
                   help="a stvit.train checkpoint, or 'auto' for OUT/last.pt if present")
    r.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    r.add_argument("--dist-backend", default="auto",
                   help="process group backend (auto: nccl on GPUs, gloo on CPUs)")
    r.add_argument("--log-every", type=int, default=20, help="steps between loss records and all-reduces")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--eval-only", action="store_true",
                   help="evaluate the --resume / --pretrained weights and exit")
    args = p.parse_args(argv)
    if args.model_kwargs is not None and not isinstance(args.model_kwargs, dict):
        p.error("--model-kwargs must be a JSON object")
    for name in ("epochs", "batch_size", "log_every", "synthetic_size", "lr"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run a training; returns ``{"epochs": [per-epoch records], "out": folder}`` (on every rank).
    Errors in the arguments or the data raise before any process group is created."""
    import stvit_kernels as sk

    args = parse_args(argv)
    check_img_size(args.img_size)
    if args.backend != "auto":
        with sk.use_backend(args.backend):  # raises ValueError naming the available ones
            pass
    train_set, val_set, num_classes = make_datasets(args)
    config = {"model": args.model, "num_classes": num_classes, "model_kwargs": args.model_kwargs,
              "img_size": args.img_size}
    resume_path = args.resume
    if resume_path == "auto":
        cand = os.path.join(args.out, "last.pt")
        resume_path = cand if os.path.isfile(cand) else None
    ckpt = load_training_checkpoint(resume_path, expect=config) if resume_path else None

    env = setup_distributed(args.device, args.dist_backend)
    try:
        with sk.use_backend(args.backend):
            return _run(args, env, train_set, val_set, config, ckpt, resume_path)
    finally:
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _run(args, env: DistEnv, train_set, val_set, config, ckpt, resume_path) -> Dict[str, Any]:
    if args.precision == "auto":
        args.precision = "bf16" if env.device.type == "cuda" else "fp32"
    workers = args.workers
    if workers is None:
        workers = 0 if args.synthetic else min(8, max(1, (os.cpu_count() or 1) // env.world_size))
    global_batch = args.batch_size * env.world_size
    if len(train_set) < global_batch:
        raise ValueError(f"the training set has {len(train_set)} images, fewer than one global batch "
                         f"({args.batch_size} per process x {env.world_size} processes)")

    # Same initial weights on every rank (DDP also broadcasts rank 0's), then per-rank RNG streams.
    torch.manual_seed(args.seed)
    model = build_model(args.model, config["num_classes"], args.model_kwargs,
                        drop_path_rate=args.drop_path,
                        backend=None if args.backend == "auto" else args.backend)
    if args.pretrained and not ckpt:
        reset = load_pretrained(model, args.pretrained)
        if env.is_main and reset:
            print(f"loaded {args.pretrained}; re-initialised {', '.join(reset)} (other class count)")
    model.to(env.device)
    if args.sync_bn:
        if env.device.type != "cuda":
            raise ValueError("--sync-bn needs GPUs (torch's SyncBatchNorm does not run on CPUs)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    raw = model
    torch.manual_seed(args.seed + 1000 * env.rank + 1)
    random.seed(args.seed + 1000 * env.rank + 1)

    train_loader = make_loader(train_set, env, args.batch_size, True, args.seed, workers)
    val_loader = make_loader(val_set, env, args.batch_size, False, args.seed, workers)
    steps_per_epoch = len(train_loader)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(round(args.warmup_epochs * steps_per_epoch))

    optimizer = torch.optim.AdamW(param_groups(raw, args.weight_decay), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total_steps, warmup_steps, args.lr, args.min_lr,
                                           args.warmup_lr) / args.lr)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    start_epoch, step, history, best = 0, 0, [], -1.0
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        history, best = list(ckpt.get("history", [])), ckpt.get("best_top1", -1.0)
        states = ckpt.get("rng") or []
        if len(states) == env.world_size:
            _set_rng_state(states[env.rank])
        elif env.is_main:
            warnings.warn(f"{resume_path} was written by {len(states)} process(es), this run has "
                          f"{env.world_size}: the RNG streams start afresh, so the run is not a bit-for-bit "
                          f"continuation")
        if env.is_main:
            print(f"resumed {resume_path} at epoch {start_epoch} (step {step})")

    model = raw
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(raw, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model, backend=args.compile_backend)

    steps_path = os.path.join(args.out, "steps.jsonl")
    if env.is_main:
        os.makedirs(args.out, exist_ok=True)
        kept = []
        if ckpt is not None and os.path.isfile(steps_path):  # drop records past the checkpoint
            with open(steps_path) as f:
                kept = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
        with open(steps_path, "w") as f:
            f.writelines(kept)
        print(f"{args.model}: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters, "
              f"{config['num_classes']} classes, {len(train_set)} train / {len(val_set)} val images at "
              f"{args.img_size}px; {env.world_size} process(es) on {env.device.type}, global batch "
              f"{global_batch}, {steps_per_epoch} steps/epoch, {args.precision}, backend {args.backend}")

    def step_log(rec):
        if env.is_main:
            with open(steps_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def write_log():
        if env.is_main:
            _save_json({"args": {k: v for k, v in vars(args).items()}, "world_size": env.world_size,
                        "config": config, "epochs": history}, os.path.join(args.out, "log.json"))

    if args.eval_only:
        rec = {"epoch": start_epoch, **evaluate(model, val_loader, env, args)}
        if env.is_main:
            print(json.dumps(rec))
        return {"epochs": [rec], "out": args.out}

    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        train_loader.sampler.set_epoch(epoch)
        train_loader.generator.manual_seed(args.seed * 100003 + epoch)
        train_set.set_epoch(epoch)
        tr = train_one_epoch(model, train_loader, criterion, optimizer, scheduler, env, args, epoch,
                             step, step_log)
        step = tr.pop("step")
        va = evaluate(model, val_loader, env, args)
        dt = time.perf_counter() - t0
        rec = {"epoch": epoch + 1, "step": step, **tr, **va, "lr": optimizer.param_groups[0]["lr"],
               "time_s": dt, "images_per_s": steps_per_epoch * global_batch / dt}
        history.append(rec)
        best = max(best, va.get("val_top1", -1.0))
        rng = _gather_rng(env)
        if env.is_main:
            state = {"format": CHECKPOINT_FORMAT, "config": config, "model": raw.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "epoch": epoch + 1, "step": step, "rng": rng, "world_size": env.world_size,
                     "history": history, "best_top1": best, "args": _plain(vars(args))}
            _save_atomic(state, os.path.join(args.out, "last.pt"))
            if va and va["val_top1"] >= best:
                _save_atomic(state, os.path.join(args.out, "best.pt"))
            if args.save_every and (epoch + 1) % args.save_every == 0:
                _save_atomic(state, os.path.join(args.out, f"epoch_{epoch + 1}.pt"))
            write_log()
            print(f"epoch {epoch + 1}/{args.epochs}: train loss {tr['train_loss']:.4f} top-1 "
                  f"{tr['train_top1']:.2f}% | val loss {va.get('val_loss', float('nan')):.4f} top-1 "
                  f"{va.get('val_top1', float('nan')):.2f}% | {dt:.1f}s", flush=True)
    return {"epochs": history, "out": args.out}


def _plain(obj):
    """Arguments as plain JSON-like values (loadable with ``weights_only=True``)."""
    return json.loads(json.dumps(obj, default=str))


def _save_json(obj, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: a bad argument, folder or checkpoint prints ``error: ...`` and exits 2."""
    try:
        main(argv)
    except (FileNotFoundError, ValueError, CheckpointMismatchError, FloatingPointError) as err:
        print(f"python -m stvit.train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
