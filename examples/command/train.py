"""A small MNIST classifier that runs as a Cohort command trial, or by hand, or under torchrun.

What it uses of Cohort's contract (docs/commands.md), each with a default for running by hand:

  COHORT_HPARAMS          JSON: lr, hidden, batch_size, limit (training samples used; 0 = all)
  COHORT_FOLD/_FOLDS      cross-validation: validate on fold FOLD of FOLDS, train on the rest
                          (unset: train on the whole training set, validate on the test set)
  COHORT_EPOCHS           epochs to train (default 3)
  COHORT_DATA             the MNIST idx files (default: data/mnist-sample of this repository)
  COHORT_CHECKPOINT_DIR   checkpoint.pt is written here before each epoch is reported
  COHORT_RESUME_DIR       on a retry: the latest stored checkpoint, to continue from
  RANK/WORLD_SIZE/MASTER_*  torch.distributed (gloo) when WORLD_SIZE > 1, as torchrun sets them

Each epoch prints one line Cohort records:
  cohort-metrics {"epoch": 3, "train_loss": 0.31, "val_loss": 0.29, "val_acc": 0.91}

Run by hand:      python3 train.py
Under torchrun:   torchrun --nproc-per-node 2 train.py
"""

import gzip
import json
import os
import struct
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))


def read_idx(path):
    """An idx file (MNIST's format, gzipped or not) as a tensor."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, dims = struct.unpack(">HBB", data[:4])
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return torch.frombuffer(bytearray(data[4 + 4 * dims :]), dtype=torch.uint8).reshape(shape)


def find(folder, stem):
    for name in (stem + ".gz", stem):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    sys.exit(f"{stem} not found in {folder}")


def load(folder):
    images = read_idx(find(folder, "train-images-idx3-ubyte")).float().div(255).flatten(1)
    labels = read_idx(find(folder, "train-labels-idx1-ubyte")).long()
    test_images = read_idx(find(folder, "t10k-images-idx3-ubyte")).float().div(255).flatten(1)
    test_labels = read_idx(find(folder, "t10k-labels-idx1-ubyte")).long()
    return images, labels, test_images, test_labels


def split(images, labels, test_images, test_labels, fold, folds, seed):
    """The fold's training and validation parts (a seeded permutation, cut into `folds` parts)."""
    if fold is None:
        return (images, labels), (test_images, test_labels)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    parts = order.chunk(folds)
    held_out = parts[fold]
    kept = torch.cat([p for i, p in enumerate(parts) if i != fold])
    return (images[kept], labels[kept]), (images[held_out], labels[held_out])


def evaluate(model, images, labels):
    with torch.no_grad():
        logits = model(images)
        return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def main():
    hparams = json.loads(os.environ.get("COHORT_HPARAMS") or "{}")
    lr = float(hparams.get("lr", 0.05))
    hidden = int(hparams.get("hidden", 64))
    batch_size = int(hparams.get("batch_size", 64))
    limit = int(hparams.get("limit", 0))
    epochs = int(os.environ.get("COHORT_EPOCHS", "3"))
    seed = int(os.environ.get("COHORT_SEED", "0"))
    fold = int(os.environ["COHORT_FOLD"]) if "COHORT_FOLD" in os.environ else None
    folds = int(os.environ.get("COHORT_FOLDS", "1"))
    data = os.environ.get("COHORT_DATA") or os.path.join(HERE, "..", "..", "data", "mnist-sample")
    checkpoint_dir = os.environ.get("COHORT_CHECKPOINT_DIR")
    resume_dir = os.environ.get("COHORT_RESUME_DIR")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    print(f"rank={rank} world_size={world} fold={fold} hparams={json.dumps(hparams, sort_keys=True)}", flush=True)

    images, labels, test_images, test_labels = load(data)
    if limit:
        images, labels = images[:limit], labels[:limit]
    (train_x, train_y), (val_x, val_y) = split(images, labels, test_images, test_labels, fold, folds, seed)

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    start = 1
    if resume_dir and os.path.exists(os.path.join(resume_dir, "checkpoint.pt")):
        state = torch.load(os.path.join(resume_dir, "checkpoint.pt"))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["epoch"] + 1
        print(f"resumed from epoch {state['epoch']}", flush=True)
    trained = nn.parallel.DistributedDataParallel(model) if world > 1 else model

    for epoch in range(start, epochs + 1):
        began = time.time()
        # Each rank takes its share of the same shuffled order; DDP averages the gradients.
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        per_rank = len(order) // world
        mine = order[rank * per_rank : (rank + 1) * per_rank]
        total, batches = 0.0, 0
        for first in range(0, len(mine) - batch_size + 1, batch_size):
            index = mine[first : first + batch_size]
            loss = F.cross_entropy(trained(train_x[index]), train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        val_loss, val_acc = evaluate(model, val_x, val_y)
        if checkpoint_dir and rank == 0:
            # Written whole, then renamed: Cohort packs the folder right after the metrics line.
            partial = os.path.join(checkpoint_dir, "checkpoint.pt.partial")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}, partial)
            os.replace(partial, os.path.join(checkpoint_dir, "checkpoint.pt"))
        metrics = {"epoch": epoch, "train_loss": total / max(batches, 1), "val_loss": val_loss, "val_acc": val_acc, "seconds": time.time() - began}
        print("cohort-metrics " + json.dumps(metrics), flush=True)

    checksum = sum(p.double().sum().item() for p in model.parameters())
    print(f"result rank={rank} world_size={world} checksum={checksum:.10f}", flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
