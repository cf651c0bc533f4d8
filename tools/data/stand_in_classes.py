"""Writes class-labelled image folders (ROOT/train/{class}/*.png, ROOT/test/{class}/*.png) for
the class-conditional WGAN-GP (examples/seed-cgan.toml) from data the repository ships.

These are STAND-INS for the seed's dementia classes (the Kaggle Alzheimer's image folder, which
cannot be shipped), so that a conditional run works out of the box:

  mri    axial slices of the committed Colin27 volume (data/mri-sample/ch2bet.nii.gz), grouped by
         level into three classes: inferior, middle, superior (the kept slices, bottom to top,
         cut into thirds). Every 4th slice of each class is held out as the test set.
  mnist  handwritten digits of an IDX dataset (default data/mnist-sample; the full MNIST in
         ../shared/datasets/mnist-10k works alike) written as 28x28 PNGs, one class per digit.

Run:
  .venv/bin/python tools/data/stand_in_classes.py mri data/stand-in/mri-levels
  .venv/bin/python tools/data/stand_in_classes.py mnist data/stand-in/digits [--digits 0,1,7] [--per-class 400]
Needs numpy and Pillow (both in the .venv with torch).
"""

import argparse
import gzip
import os
import struct

import numpy as np
from PIL import Image

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))
DTYPES = {2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 64: np.float64}


def read_nifti(path):
    """A single-file NIfTI-1 volume as an [X, Y, Z] float array (x fastest on disk)."""
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        data = f.read()
    order = "<" if struct.unpack("<i", data[:4])[0] == 348 else ">"
    dims = struct.unpack(order + "8h", data[40:56])
    datatype = struct.unpack(order + "h", data[70:72])[0]
    vox_offset = int(struct.unpack(order + "f", data[108:112])[0])
    slope, inter = struct.unpack(order + "2f", data[112:120])
    shape = dims[1:4]
    dtype = np.dtype(DTYPES[datatype]).newbyteorder(order)
    count = int(np.prod(shape))
    voxels = np.frombuffer(data, dtype, count, vox_offset).astype(np.float64)
    if slope not in (0.0, 1.0) or inter != 0.0:
        voxels = voxels * (slope or 1.0) + inter
    return voxels.reshape(shape[::-1]).transpose(2, 1, 0)


def write_png(array01, path, size=None):
    image = Image.fromarray(np.clip(np.round(array01 * 255.0), 0, 255).astype(np.uint8), mode="L")
    if size:
        image = image.resize((size, size), Image.BILINEAR)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path)


def mri(out, size, min_foreground):
    volume = read_nifti(os.path.join(ROOT, "data", "mri-sample", "ch2bet.nii.gz"))
    volume = (volume - volume.min()) / max(volume.max() - volume.min(), 1e-12)
    kept = [z for z in range(volume.shape[2]) if (volume[:, :, z] > 0.1).mean() >= min_foreground]
    thirds = np.array_split(np.array(kept), 3)
    counts = {}
    for name, zs in zip(["inferior", "middle", "superior"], thirds):
        for i, z in enumerate(zs):
            # Anterior at the top (RAS: y grows anteriorly, image rows grow downwards).
            slice_ = volume[:, :, z].T[::-1]
            part = "test" if i % 4 == 3 else "train"
            write_png(slice_, os.path.join(out, part, name, f"z{z:03d}.png"), size)
            counts[(part, name)] = counts.get((part, name), 0) + 1
    return counts


def read_idx(images_path, labels_path):
    with gzip.open(images_path, "rb") as f:
        _, n, rows, cols = struct.unpack(">4i", f.read(16))
        images = np.frombuffer(f.read(), np.uint8).reshape(n, rows, cols)
    with gzip.open(labels_path, "rb") as f:
        struct.unpack(">2i", f.read(8))
        labels = np.frombuffer(f.read(), np.uint8)
    return images, labels


def mnist(out, source, digits, per_class):
    counts = {}
    for part, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = read_idx(os.path.join(source, f"{prefix}-images-idx3-ubyte.gz"), os.path.join(source, f"{prefix}-labels-idx1-ubyte.gz"))
        limit = per_class if part == "train" else max(per_class // 4, 1)
        for digit in digits:
            rows = np.nonzero(labels == digit)[0][:limit] if limit else np.nonzero(labels == digit)[0]
            for index in rows:
                write_png(images[index] / 255.0, os.path.join(out, part, str(digit), f"{index:05d}.png"))
            counts[(part, str(digit))] = len(rows)
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    m = sub.add_parser("mri", help="axial MRI slices grouped inferior/middle/superior")
    m.add_argument("out")
    m.add_argument("--size", type=int, default=64, help="side of the written PNGs (the loader resizes anyway)")
    m.add_argument("--min-foreground", type=float, default=0.05)
    d = sub.add_parser("mnist", help="digits of an IDX dataset as PNGs, one class per digit")
    d.add_argument("out")
    d.add_argument("--source", default=os.path.join(ROOT, "data", "mnist-sample"))
    d.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    d.add_argument("--per-class", type=int, default=0, help="training images per digit (0: all); the test set gets a quarter")
    args = parser.parse_args()
    if args.kind == "mri":
        counts = mri(args.out, args.size, args.min_foreground)
    else:
        counts = mnist(args.out, args.source, [int(d) for d in args.digits.split(",")], args.per_class)
    for (part, name), count in sorted(counts.items()):
        print(f"{part}/{name}: {count} images")


if __name__ == "__main__":
    main()
