"""`fused-resnet train`: train a pre-activation ResNet on scikit-learn's digits (1,797 real 8x8 images of
handwritten digits, shipped inside scikit-learn: no download).

  fused-resnet train                       # the fused model
  fused-resnet train --compare             # fused and unfused side by side, same weights, seed and batches
  torchrun --nproc_per_node 2 -m fused_resnet train --compare   # DDP, synchronized BN statistics

Prints a per-epoch table, shows a progress bar per epoch (when the output is not a terminal: progress lines
on stderr, at least one per epoch), and writes OUT/train.png (loss and accuracy curves) and OUT/train.json
(every figure of the table plus the environment). On a GPU the fused model runs the fused kernels (bf16
autocast by default); on the CPU it runs the fused op's reference path (--backend triton: the Triton
interpreter, slow). Errors are one line with exit code 2 (--debug adds the traceback).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from . import _cli, models
from .backends import available_backends

MODELS = ("preact_resnet20", "preact_resnet32", "preact_resnet56", "preact_resnet110")
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser():
    p = _cli.ArgumentParser(prog="fused-resnet train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="preact_resnet20")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate (SGD, Nesterov momentum, cosine decay)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "triton", "cuda"),
                   help="fused model's backend (auto: the fused kernels on a GPU, the reference path on the CPU; "
                        "triton on the CPU runs in the Triton interpreter: slow)")
    p.add_argument("--amp", choices=tuple(AMP), help="autocast dtype (default: bf16 on a GPU, none on the CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--compare", action="store_true", help="also train the unfused model from the same weights")
    p.add_argument("--out", default="train-out", help="folder for train.png and train.json")
    return p


def _check(args):
    errors = []
    if args.epochs < 1:
        errors.append("--epochs must be at least 1")
    if args.batch_size < 2:
        errors.append("--batch-size must be at least 2 (batch statistics need two samples)")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        errors.append("--lr must be a positive number")
    if args.weight_decay < 0:
        errors.append("--weight-decay must be >= 0")
    return errors


def load_digits(seed: int):
    """(x_train, y_train, x_test, y_test): a stratified 80/20 split, images [N, 1, 8, 8] standardized
    with the training set's mean and std."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.int64)
    idx_tr, idx_te = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2, random_state=seed,
                                      stratify=y.numpy())
    x_tr, x_te = x[idx_tr], x[idx_te]
    mean, std = x_tr.mean(), x_tr.std()
    return (x_tr - mean) / std, y[idx_tr], (x_te - mean) / std, y[idx_te]


class Dist:
    """torchrun's environment, or a single process."""

    def __init__(self, device):
        import torch.distributed as dist

        self.dist = dist
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.on = self.world > 1
        if self.on and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def sum(self, values):
        t = torch.tensor(values, dtype=torch.float64)
        if self.on:
            self.dist.all_reduce(t)
        return t.tolist()

    def close(self):
        if self.on and self.dist.is_initialized():
            self.dist.destroy_process_group()


class Trainer:
    """One model, its optimizer and schedule, trained on this process's shard of every epoch."""

    def __init__(self, name, model, args, steps_per_epoch, device, dist):
        self.name, self.model, self.device, self.dist = name, model, device, dist
        self.net = model
        if dist.on:
            self.net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        self.opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                   weight_decay=args.weight_decay)
        total = args.epochs * steps_per_epoch
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        self.amp = AMP[args.amp]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        self.history = []

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)

    def train_epoch(self, batches, bar):
        self.net.train()
        loss_sum = correct = count = 0.0
        t0 = time.perf_counter()
        for xb, yb in batches:
            with self._autocast():
                logits = self.net(xb)
            loss = F.cross_entropy(logits.float(), yb)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.sched.step()
            loss_sum += loss.item() * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
            count += len(yb)
            bar.update(1)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        loss_sum, correct, count = self.dist.sum([loss_sum, correct, count])
        return loss_sum / count, correct / count, seconds, count / seconds

    @torch.no_grad()
    def evaluate(self, x, y, batch):
        self.model.eval()
        loss_sum = correct = 0.0
        for i in range(0, len(y), batch):
            with self._autocast():
                logits = self.model(x[i:i + batch]).float()
            loss_sum += F.cross_entropy(logits, y[i:i + batch], reduction="sum").item()
            correct += (logits.argmax(1) == y[i:i + batch]).sum().item()
        return loss_sum / len(y), correct / len(y)


def _epoch_batches(x, y, batch, epoch, seed, dist):
    """This rank's batches of one epoch: one permutation shared by all ranks (seeded by epoch), each
    rank taking every world-th sample, as DistributedSampler does; the last partial batch is dropped so
    every step's batch statistics come from a full batch."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(len(y), generator=g)[dist.rank::dist.world]
    n = len(perm) // batch * batch
    return [(x[perm[i:i + batch]], y[perm[i:i + batch]]) for i in range(0, n, batch)]


def plot(history, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in history.items():
        ep = [r["epoch"] for r in rows]
        ax_l.plot(ep, [r["train_loss"] for r in rows], "-", label=f"{name} train")
        ax_l.plot(ep, [r["test_loss"] for r in rows], "--", label=f"{name} test")
        ax_a.plot(ep, [100 * r["train_acc"] for r in rows], "-", label=f"{name} train")
        ax_a.plot(ep, [100 * r["test_acc"] for r in rows], "--", label=f"{name} test")
    ax_l.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    ax_a.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_l, ax_a):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 1.25 ticks
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    args = build_parser().parse_args(argv)
    errors = _check(args)
    try:
        # The same device/backend resolution as every subcommand; a backend that cannot run here is a
        # one-line error before any data is loaded.
        device = _cli.resolve_device(args.device)
        args.backend = _cli.resolve_backend(args.backend, device)
    except _cli.UsageError as e:
        errors.append(str(e))
    if errors:
        return _cli.fail("fused-resnet train", "; ".join(errors))
    if args.amp is None:
        args.amp = "bf16" if device.type == "cuda" else "none"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist = Dist(device)
    try:
        return _run(args, device, dist)
    finally:
        dist.close()


def _run(args, device, dist):
    lead = dist.rank == 0
    say = print if lead else (lambda *a, **k: None)
    x_tr, y_tr, x_te, y_te = (t.to(device) for t in load_digits(args.seed))
    backend = args.backend  # resolved in main()
    factory = getattr(models, args.model)
    torch.manual_seed(args.seed)
    unfused = factory(num_classes=10, in_channels=1, fused=False, sync_stats=dist.on).to(device)
    fused = factory(num_classes=10, in_channels=1, fused=True, backend=backend, sync_stats=dist.on).to(device)
    fused.load_state_dict(unfused.state_dict())  # the same initial weights
    if device.type == "cuda":
        fused, unfused = (m.to(memory_format=torch.channels_last) for m in (fused, unfused))
    steps = len(_epoch_batches(x_tr, y_tr, args.batch_size, 0, args.seed, dist))
    if steps == 0:
        return _cli.fail("fused-resnet train", f"--batch-size {args.batch_size} is larger than this process's "
                         f"{len(y_tr) // dist.world} training images")
    names = {"fused": fused, "unfused": unfused} if args.compare else {"fused": fused}
    trainers = {n: Trainer(n, m, args, steps, device, dist) for n, m in names.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    say(f"digits: {len(y_tr)} train / {len(y_te)} test images (8x8); {args.model}, {args.epochs} epochs, "
        f"batch {args.batch_size} x {dist.world} process(es), amp {args.amp}, on {where}; "
        f"fused backend: {backend}" + (" (the fused op's plain-PyTorch path)" if backend == "reference" else ""))
    if dist.on:
        say(f"DistributedDataParallel over {dist.world} processes; BN statistics synchronized (SyncBatchNorm2d)")
    say(str(available_backends()))
    # Two header lines (model, then column) keep a --compare table within 100 columns.
    cols = ("trn loss", "trn acc", "tst loss", "tst acc", "img/s")
    header = ["epoch"] + [c for _ in names for c in cols]
    widths = [5] + [max(7, len(c)) for _ in names for c in cols]
    group = sum(widths[1:1 + len(cols)]) + 2 * (len(cols) - 1)
    say((" " * widths[0] + "".join(f"  {n:^{group}}" for n in names)).rstrip())
    say("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    history = {n: [] for n in names}
    for epoch in range(1, args.epochs + 1):
        batches = _epoch_batches(x_tr, y_tr, args.batch_size, epoch, args.seed, dist)
        row = [str(epoch)]
        with _cli.progress(total=len(batches) * len(trainers), desc=f"epoch {epoch}/{args.epochs}", leave=False,
                           disable=not lead) as bar:
            for n, tr in trainers.items():
                tr_loss, tr_acc, secs, ips = tr.train_epoch(batches, bar)
                te_loss, te_acc = tr.evaluate(x_te, y_te, 256)
                history[n].append({"epoch": epoch, "train_loss": tr_loss, "train_acc": tr_acc, "test_loss": te_loss,
                                   "test_acc": te_acc, "seconds": secs, "images_per_s": ips})
                row += [f"{tr_loss:.4f}", f"{100 * tr_acc:.2f}%", f"{te_loss:.4f}", f"{100 * te_acc:.2f}%", f"{ips:.0f}"]
        say("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    summary = {n: {"final_test_acc": h[-1]["test_acc"], "best_test_acc": max(r["test_acc"] for r in h),
                   "final_test_loss": h[-1]["test_loss"]} for n, h in history.items()}
    for n, s in summary.items():
        say(f"{n}: final test accuracy {100 * s['final_test_acc']:.2f}% (best {100 * s['best_test_acc']:.2f}%), "
            f"final test loss {s['final_test_loss']:.4f}")
    if args.compare:
        # Early epochs at a high learning rate are chaotic (float32 rounding differences grow), so the
        # agreement is judged on where training ends: the final epoch and the mean over the second half.
        gaps = [abs(a["test_acc"] - b["test_acc"]) for a, b in zip(history["fused"], history["unfused"])]
        half = gaps[len(gaps) // 2:]
        summary.update(final_test_acc_gap=gaps[-1], mean_test_acc_gap_second_half=sum(half) / len(half),
                       max_test_acc_gap=max(gaps))
        say(f"fused vs unfused test accuracy: final gap {100 * gaps[-1]:.2f} points, mean gap over the second "
            f"half {100 * sum(half) / len(half):.2f} points, largest {100 * max(gaps):.2f} (epoch "
            f"{gaps.index(max(gaps)) + 1}); one test image is {100 / len(y_te):.2f} points")
    if lead:
        from .bench.run import environment

        os.makedirs(args.out, exist_ok=True)
        env = environment(device)
        title = (f"{args.model} on digits, {env['device']}, fused backend {backend}, amp {args.amp}, "
                 f"{dist.world} proc, commit {env['commit']}")
        png = plot(history, os.path.join(args.out, "train.png"), title)
        with open(os.path.join(args.out, "train.json"), "w") as f:
            json.dump({"args": vars(args), "backend": backend, "world_size": dist.world, **env,
                       "history": history, "summary": summary}, f, indent=1)
        say(f"wrote {png} and {os.path.join(args.out, 'train.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
