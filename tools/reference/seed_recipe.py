"""The seed's autoencoder + classifier recipe (report §1.4-1.5) in plain PyTorch eager, as the
baseline Cohort's own recipe is compared with (tools/bench/seed_recipe.py runs both).

It mirrors worker/src/train/{dae,classifier}.rs: an augmented copy of the training set (random
rotation, translation, shear through affine_grid/grid_sample, zeros outside), fresh Gaussian
noise on every batch, Adam with L2 weight decay, MSE for the autoencoder; then the classifier
(pretrained encoder + 256 + 10, log-softmax, NLL) with encoder lr 1e-4 and head lr 1e-3. Test
figures are computed on one fixed noisy copy of the test set. Random draws differ from Cohort's
(different generators), so the curves agree in distribution, not bit for bit.

Prints one JSON object: {"dae_test_mse": [...], "classifier_test_accuracy": [...], "seconds": ...}.
"""

import argparse
import gzip
import json
import math
import os
import struct
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(__file__))
from dae_reference import Classifier, Dae  # noqa: E402


def read_idx(path: str) -> torch.Tensor:
    raw = open(path, "rb").read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    magic, count = struct.unpack(">II", raw[:8])
    if magic == 0x803:
        rows, cols = struct.unpack(">II", raw[8:16])
        data = torch.frombuffer(bytearray(raw[16:16 + count * rows * cols]), dtype=torch.uint8)
        return data.view(count, 1, rows, cols).float() / 255.0
    return torch.frombuffer(bytearray(raw[8:8 + count]), dtype=torch.uint8).long()


def find(folder: str, stem: str) -> str:
    names = [n for n in os.listdir(folder) if n.startswith(stem)]
    if not names:
        raise SystemExit(f"{folder}: no {stem}[.gz]")
    return os.path.join(folder, names[0])


def augmented_copy(images: torch.Tensor, rotate_deg: float, translate: float, shear_deg: float) -> torch.Tensor:
    n, _, h, w = images.shape
    rot = (torch.rand(n) * 2 - 1) * math.radians(rotate_deg)
    shear = torch.tan((torch.rand(n) * 2 - 1) * math.radians(shear_deg))
    tx = (torch.rand(n) * 2 - 1) * translate * 2  # normalized units: a fraction of the side is 2x that
    ty = (torch.rand(n) * 2 - 1) * translate * 2
    cos, sin = torch.cos(rot), torch.sin(rot)
    forward = torch.stack([torch.stack([cos, cos * shear - sin], -1), torch.stack([sin, sin * shear + cos], -1)], -2)
    inverse = torch.linalg.inv(forward)
    shift = torch.stack([tx, ty], -1).unsqueeze(-1)
    theta = torch.cat([inverse, -inverse @ shift], -1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--final-epochs", type=int, default=40)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-6)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train_x, train_y = read_idx(find(args.data, "train-images-idx3-ubyte")), read_idx(find(args.data, "train-labels-idx1-ubyte"))
    test_x, test_y = read_idx(find(args.data, "t10k-images-idx3-ubyte")), read_idx(find(args.data, "t10k-labels-idx1-ubyte"))
    with torch.no_grad():
        train_x = torch.cat([train_x, augmented_copy(train_x, 15.0, 0.1, 10.0)])
    train_y = torch.cat([train_y, train_y])
    test_noisy = test_x + torch.randn_like(test_x) * args.noise
    started = time.time()

    model = Dae(4)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    test_mse = []
    for _ in range(args.final_epochs):
        model.train()
        for batch in torch.randperm(len(train_x)).split(args.batch_size):
            clean = train_x[batch]
            loss = F.mse_loss(model(clean + torch.randn_like(clean) * args.noise), clean)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            test_mse.append(F.mse_loss(model(test_noisy), test_x).item())

    classifier = Classifier(4)
    classifier.encoder.load_state_dict(model.encoder.state_dict())
    groups = [{"params": classifier.encoder.parameters(), "lr": 1e-4}, {"params": classifier.head.parameters(), "lr": 1e-3}]
    optimizer = torch.optim.Adam(groups, weight_decay=1e-5)
    accuracy = []
    for _ in range(args.finetune_epochs):
        for batch in torch.randperm(len(train_x)).split(256):
            images = train_x[batch]
            loss = F.nll_loss(classifier(images + torch.randn_like(images) * args.noise), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            accuracy.append((classifier(test_noisy).argmax(-1) == test_y).float().mean().item())
    print(json.dumps({"dae_test_mse": test_mse, "classifier_test_accuracy": accuracy, "seconds": time.time() - started}))


if __name__ == "__main__":
    main()
