"""One rank of a PyTorch DistributedDataParallel (gloo) gang: the anchor of `make bench-gang`.

--model wgan: the WGAN-GP of tools/reference/wgan_reference.py, each rank on its share of the
global batch; per critic step the critic loss with its gradient penalty (autograd.grad with
create_graph=True, then backward through it), gradients averaged by DDP; every `critic_steps`-th
critic step a generator step (generator through DDP, the critic outside its DDP wrapper so its
gradients are not reduced). --model dae: the seed's denoising autoencoder (noise std 0.3, Adam
lr 1e-3, weight decay 1e-6).

Each rank prints one JSON object: global training samples per second over the timed steps, and
the rank's CPU seconds over them.

Run (2 ranks): python ddp_gang.py --rank R --world 2 --port P [--model wgan|dae]
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(__file__))
from dae_reference import Dae  # noqa: E402
from wgan_reference import Critic, Generator  # noqa: E402


def wgan(args, world):
    local = args.batch // world
    widths = [int(w) for w in args.widths.split(",")]
    generator, critic = DDP(Generator(widths)), DDP(Critic(widths))
    g_opt = torch.optim.Adam(generator.parameters(), lr=1e-4, betas=(0.0, 0.9))
    c_opt = torch.optim.Adam(critic.parameters(), lr=1e-4, betas=(0.0, 0.9))
    real = torch.rand(local, 1, 64, 64) * 2 - 1
    taken = [0]

    def step():
        with torch.no_grad():
            fake = generator.module(torch.randn(local, 100))
        eps = torch.rand(local).view(-1, 1, 1, 1)
        interpolates = (fake + (real - fake) * eps).requires_grad_(True)
        # The penalty's gradient through the bare module: DDP's reducer must see one backward per
        # step, the loss's below.
        grads = torch.autograd.grad(critic.module(interpolates).sum(), interpolates, create_graph=True)[0]
        penalty = args.gp_lambda * ((grads.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
        scores = critic(torch.cat([fake, real]))
        loss = scores[:local].mean() - scores[local:].mean() + penalty
        c_opt.zero_grad()
        loss.backward()
        c_opt.step()
        taken[0] += 1
        if taken[0] % args.critic_steps == 0:
            for p in critic.parameters():
                p.requires_grad_(False)
            g_loss = -critic.module(generator(torch.randn(local, 100))).mean()
            g_opt.zero_grad()
            g_loss.backward()
            g_opt.step()
            for p in critic.parameters():
                p.requires_grad_(True)

    return step


def dae(args, world):
    local = args.batch // world
    model = DDP(Dae(4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6)
    clean = torch.rand(local, 1, 28, 28)

    def step():
        loss = F.mse_loss(model(clean + torch.randn_like(clean) * 0.3), clean)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", choices=["wgan", "dae"], default="wgan")
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--widths", default="128,64,32,16")
    parser.add_argument("--critic-steps", type=int, default=5)
    parser.add_argument("--gp-lambda", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=args.world)
    step = wgan(args, args.world) if args.model == "wgan" else dae(args, args.world)
    for _ in range(args.warmup):
        step()
    dist.barrier()
    started = time.perf_counter()
    cpu_started = time.process_time()
    for _ in range(args.steps):
        step()
    dist.barrier()
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    print(json.dumps({"samples_per_second": args.batch * args.steps / seconds, "seconds": seconds, "cpu_seconds": cpu, "samples": args.batch * args.steps}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
