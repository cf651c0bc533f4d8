"""NumPy reference for Cohort's sliced Wasserstein distance over Laplacian-pyramid patches
(worker/src/swd.rs), after Karras et al. 2018's sliced_wasserstein.py: a 5x5 binomial filter
with mirrored borders (scipy.ndimage's mode="mirror", written out here with np.pad "reflect"),
pyr_down = filter then every second pixel, pyr_up = zeros inserted then the filter times 4,
levels down to 16x16; 7x7 neighbourhoods normalised per channel by their set's mean and
population standard deviation; the distance is the mean absolute difference of the sorted
projections on random unit directions, averaged over the direction sets.

The random parts (patch corners, directions) are drawn here with NumPy and written into the
fixture, so the Rust test feeds both implementations the same draws.

Writes worker/tests/fixtures/swd_reference.safetensors.
Run: .venv/bin/python tools/reference/swd_reference.py
"""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
import safetensors_io  # noqa: E402

PATCH = 7
PER_IMAGE = 16
REPEATS = 2
DIRECTIONS = 32
KERNEL = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]).astype(np.float64) / 256.0


def convolve(images, kernel):
    """Same-size 5x5 filtering of [N, C, H, W] with mirrored borders."""
    padded = np.pad(images, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    h, w = images.shape[2:]
    out = np.zeros_like(images)
    for dy in range(5):
        for dx in range(5):
            out += kernel[dy, dx] * padded[:, :, dy:dy + h, dx:dx + w]
    return out


def pyr_down(images):
    return convolve(images, KERNEL)[:, :, ::2, ::2]


def pyr_up(images):
    n, c, h, w = images.shape
    up = np.zeros((n, c, 2 * h, 2 * w), images.dtype)
    up[:, :, ::2, ::2] = images
    return convolve(up, KERNEL * 4.0)


def laplacian_pyramid(images, levels):
    pyramid = [images]
    for _ in range(1, levels):
        pyramid.append(pyr_down(pyramid[-1]))
        pyramid[-2] = pyramid[-2] - pyr_up(pyramid[-1])
    return pyramid


def descriptors(level, positions):
    rows = []
    for i in range(level.shape[0]):
        for y, x in positions[i]:
            rows.append(level[i, :, y:y + PATCH, x:x + PATCH])
    desc = np.stack(rows)  # [K, C, 7, 7]
    desc = desc - desc.mean(axis=(0, 2, 3), keepdims=True)
    desc = desc / desc.std(axis=(0, 2, 3), keepdims=True)
    return desc.reshape(desc.shape[0], -1)


def sliced_wasserstein(a, b, direction_sets):
    results = []
    for dirs in direction_sets:
        pa = np.sort(a @ dirs, axis=0)
        pb = np.sort(b @ dirs, axis=0)
        results.append(np.mean(np.abs(pa - pb)))
    return float(np.mean(results))


def main():
    rng = np.random.default_rng(2018)
    n, size = 3, 64
    real = rng.uniform(-1, 1, (n, 1, size, size)).astype(np.float32)
    # Smoother fakes: a blurred copy of noise, so the two sets differ at every level.
    fake = convolve(rng.uniform(-1, 1, (n, 1, size, size)), KERNEL).astype(np.float32)
    resolutions = []
    r = size
    while r >= 16:
        resolutions.append(r)
        r //= 2
    out = {"input.real": torch.from_numpy(real), "input.fake": torch.from_numpy(fake)}
    real_pyramid = laplacian_pyramid(real.astype(np.float64), len(resolutions))
    fake_pyramid = laplacian_pyramid(fake.astype(np.float64), len(resolutions))
    distances = []
    for index, resolution in enumerate(resolutions):
        real_positions = rng.integers(0, resolution - PATCH, (n, PER_IMAGE, 2))
        fake_positions = rng.integers(0, resolution - PATCH, (n, PER_IMAGE, 2))
        dirs = []
        for _ in range(REPEATS):
            d = rng.standard_normal((PATCH * PATCH, DIRECTIONS))
            dirs.append((d / np.sqrt(np.sum(np.square(d), axis=0, keepdims=True))).astype(np.float32))
        distance = sliced_wasserstein(descriptors(real_pyramid[index], real_positions), descriptors(fake_pyramid[index], fake_positions), [d.astype(np.float64) for d in dirs])
        distances.append(distance)
        out[f"level{index}.pyramid.real"] = torch.from_numpy(real_pyramid[index].astype(np.float32))
        out[f"level{index}.positions.real"] = torch.from_numpy(real_positions.astype(np.int64))
        out[f"level{index}.positions.fake"] = torch.from_numpy(fake_positions.astype(np.int64))
        for r, d in enumerate(dirs):
            out[f"level{index}.directions{r}"] = torch.from_numpy(d)
        out[f"level{index}.swd"] = torch.tensor(distance, dtype=torch.float64)
    out["swd"] = torch.tensor(float(np.mean(distances)), dtype=torch.float64)
    path = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "worker", "tests", "fixtures", "swd_reference.safetensors"))
    safetensors_io.save(out, path)
    print("swd per level", [round(d, 6) for d in distances], "mean", round(float(np.mean(distances)), 6))


if __name__ == "__main__":
    main()
