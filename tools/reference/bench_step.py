"""PyTorch eager counterpart of worker/examples/bench_step.rs: the same models, batches and
optimizer steps, timed the same way; prints one JSON object of samples per second."""

import json
import os
import sys
import time

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(__file__))
from dae_reference import Classifier, Dae  # noqa: E402
from wgan_reference import Critic, Generator  # noqa: E402


def measure(batch, warmup, steps, step):
    for _ in range(warmup):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - started)


def dae(batch):
    model = Dae(4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6)
    clean = torch.rand(batch, 1, 28, 28)

    def step():
        loss = F.mse_loss(model(clean + torch.randn_like(clean) * 0.3), clean)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return measure(batch, 10, 150, step)


def classifier(batch):
    model = Classifier(4)
    optimizer = torch.optim.Adam(
        [{"params": model.encoder.parameters(), "lr": 1e-4}, {"params": model.head.parameters(), "lr": 1e-3}], weight_decay=1e-5
    )
    images, labels = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def step():
        loss = F.nll_loss(model(images + torch.randn_like(images) * 0.3), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return measure(batch, 10, 300, step)


def wgan(widths, batch, steps):
    generator, critic = Generator(widths), Critic(widths)
    g_opt = torch.optim.Adam(generator.parameters(), lr=1e-4, betas=(0.0, 0.9))
    c_opt = torch.optim.Adam(critic.parameters(), lr=1e-4, betas=(0.0, 0.9))
    real = torch.rand(batch, 1, 64, 64) * 2 - 1

    def step():
        with torch.no_grad():
            fake = generator(torch.randn(batch, 100))
        eps = torch.rand(batch).view(-1, 1, 1, 1)
        interpolates = (fake + (real - fake) * eps).requires_grad_(True)
        grads = torch.autograd.grad(critic(interpolates).sum(), interpolates, create_graph=True)[0]
        penalty = 10.0 * ((grads.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
        loss = critic(fake).mean() - critic(real).mean() + penalty
        c_opt.zero_grad()
        loss.backward()
        c_opt.step()
        g_loss = -critic(generator(torch.randn(batch, 100))).mean()
        g_opt.zero_grad()
        g_loss.backward()
        g_opt.step()

    return measure(batch, 1, steps, step)


def main():
    threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 2
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    # `--only NAME` runs one step (for profiling it alone).
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    steps = {
        "dae_b256": lambda: dae(256),
        "classifier_b256": lambda: classifier(256),
        "wgan_reduced_b64": lambda: wgan([128, 64, 32, 16], 64, 30),
        "wgan_full_b16": lambda: wgan([1024, 512, 256, 128], 16, 6),
    }
    print(json.dumps({name: run() for name, run in steps.items() if only in (None, name)}))


if __name__ == "__main__":
    main()
