"""PyTorch reference for the seed's WGAN-GP (report §2.3) at reduced width.

Writes worker/tests/fixtures/wgan_reference.safetensors: generator and critic weights and
buffers (`generator.*`, `critic.*`, named as in the Rust model), a real batch, the noise, the
interpolation coefficients, the critic loss with its gradient penalty (λ = 10) and every critic
gradient (double backward), and the generator loss and every generator gradient.
The Rust test worker/tests/reference.rs must match.

It also writes worker/tests/fixtures/cwgan_reference.safetensors: the class-conditional
networks (a class embedding concatenated to the noise; a projection critic) at widths 16/8/4,
which make 32x32 images (one stride-2 stage fewer than the seed's 64x64), 3 classes, with the
same losses and gradients.

Run: .venv/bin/python tools/reference/wgan_reference.py
"""

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import safetensors_io  # noqa: E402

WIDTHS = [16, 8, 8, 4]
LAMBDA = 10.0


CLASS_EMBED_DIM = 32


class Generator(nn.Module):
    """len(widths) stride-2 stages after a 1x1 -> 4x4 one; with classes, a class embedding is
    concatenated to the noise."""

    def __init__(self, widths, classes=0):
        super().__init__()
        self.stages = len(widths)
        ch = [100 + (CLASS_EMBED_DIM if classes else 0), *widths, 1]
        for i in range(self.stages + 1):
            first = i == 0
            conv = nn.ConvTranspose2d(ch[i], ch[i + 1], 4, stride=1 if first else 2, padding=0 if first else 1, bias=i == self.stages)
            setattr(self, f"deconv{i + 1}", conv)
        for i in range(self.stages):
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(ch[i + 1]))
        if classes:
            self.embedding = nn.Embedding(classes, CLASS_EMBED_DIM)

    def forward(self, z, labels=None):
        z = z.view(-1, 100)
        if labels is not None:
            z = torch.cat([z, self.embedding(labels)], 1)
        x = z.view(z.shape[0], -1, 1, 1)
        for i in range(self.stages):
            x = torch.relu(getattr(self, f"bn{i + 1}")(getattr(self, f"deconv{i + 1}")(x)))
        return torch.tanh(getattr(self, f"deconv{self.stages + 1}")(x))


class Critic(nn.Module):
    """Mirrors the generator; with classes, a projection critic (Miyato & Koyama, 2018)."""

    def __init__(self, widths, classes=0):
        super().__init__()
        self.stages = len(widths)
        ch = [1, *reversed(widths), 1]
        for i in range(self.stages + 1):
            last = i == self.stages
            conv = nn.Conv2d(ch[i], ch[i + 1], 4, stride=1 if last else 2, padding=0 if last else 1, bias=i == 0 or last)
            setattr(self, f"conv{i + 1}", conv)
        for i in range(1, self.stages):
            setattr(self, f"in{i + 1}", nn.InstanceNorm2d(ch[i + 1], affine=True))
        if classes:
            self.projection = nn.Embedding(classes, ch[self.stages])

    def forward(self, x, labels=None):
        x = nn.functional.leaky_relu(self.conv1(x), 0.2)
        for i in range(1, self.stages):
            x = nn.functional.leaky_relu(getattr(self, f"in{i + 1}")(getattr(self, f"conv{i + 1}")(x)), 0.2)
        scores = getattr(self, f"conv{self.stages + 1}")(x).view(-1)
        if labels is not None:
            scores = scores + (self.projection(labels) * x.sum(dim=(2, 3))).sum(1)
        return scores


def init(module: nn.Module) -> None:
    for name, p in module.named_parameters():
        with torch.no_grad():
            if name.endswith("weight") and p.dim() > 1:
                p.normal_(0.0, 0.02)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))


def main() -> None:
    unconditional()
    conditional()


def unconditional() -> None:
    torch.manual_seed(777)
    generator, critic = Generator(WIDTHS), Critic(WIDTHS)
    init(generator)
    init(critic)
    out = {}
    for prefix, module in (("generator", generator), ("critic", critic)):
        out.update({f"{prefix}.{n}": t.detach().clone() for n, t in module.named_parameters()})
        out.update({f"{prefix}.{n}": t.detach().clone() for n, t in module.named_buffers() if "num_batches" not in n})
    real = torch.rand(4, 1, 64, 64) * 2 - 1
    noise = torch.randn(4, 100)
    epsilon = torch.rand(4)
    out["input.real"], out["input.noise"], out["input.epsilon"] = real, noise, epsilon

    # Critic step: fake images are constants; the penalty needs the double backward.
    fake = generator(noise).detach()
    out["input.fake"] = fake
    interpolates = (fake + (real - fake) * epsilon.view(-1, 1, 1, 1)).requires_grad_(True)
    gradients = torch.autograd.grad(critic(interpolates).sum(), interpolates, create_graph=True)[0]
    penalty = LAMBDA * ((gradients.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
    critic_loss = critic(fake).mean() - critic(real).mean() + penalty
    critic.zero_grad()
    critic_loss.backward()
    out["critic.loss"], out["critic.penalty"] = critic_loss.detach().reshape(()), penalty.detach().reshape(())
    out.update({f"grad.critic.{n}": p.grad.detach().clone() for n, p in critic.named_parameters()})

    # Generator step, on fresh fakes from the same noise (the generator is in training mode).
    critic.zero_grad()
    generator.zero_grad()
    generator_loss = -critic(generator(noise)).mean()
    generator_loss.backward()
    out["generator.loss"] = generator_loss.detach().reshape(())
    out.update({f"grad.generator.{n}": p.grad.detach().clone() for n, p in generator.named_parameters()})

    path = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "worker", "tests", "fixtures", "wgan_reference.safetensors"))
    safetensors_io.save(out, path)
    print(f"critic loss {critic_loss.item():.6f} (penalty {penalty.item():.6f}), generator loss {generator_loss.item():.6f}")


def conditional() -> None:
    """The class-conditional networks at 32x32 (widths 16/8/4), 3 classes."""
    torch.manual_seed(1919)
    widths, classes, batch = [16, 8, 4], 3, 6
    generator, critic = Generator(widths, classes), Critic(widths, classes)
    init(generator)
    init(critic)
    with torch.no_grad():
        generator.embedding.weight.normal_(0.0, 1.0)
        critic.projection.weight.normal_(0.0, 0.1)
    out = {}
    for prefix, module in (("generator", generator), ("critic", critic)):
        out.update({f"{prefix}.{n}": t.detach().clone() for n, t in module.named_parameters()})
        out.update({f"{prefix}.{n}": t.detach().clone() for n, t in module.named_buffers() if "num_batches" not in n})
    real = torch.rand(batch, 1, 32, 32) * 2 - 1
    noise = torch.randn(batch, 100)
    epsilon = torch.rand(batch)
    labels = torch.tensor([0, 2, 1, 2, 0, 1], dtype=torch.int64)
    out["input.real"], out["input.noise"], out["input.epsilon"], out["input.labels"] = real, noise, epsilon, labels

    fake = generator(noise, labels).detach()
    out["input.fake"] = fake
    interpolates = (fake + (real - fake) * epsilon.view(-1, 1, 1, 1)).requires_grad_(True)
    gradients = torch.autograd.grad(critic(interpolates, labels).sum(), interpolates, create_graph=True)[0]
    penalty = LAMBDA * ((gradients.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
    critic_loss = critic(fake, labels).mean() - critic(real, labels).mean() + penalty
    critic.zero_grad()
    critic_loss.backward()
    out["critic.loss"], out["critic.penalty"] = critic_loss.detach().reshape(()), penalty.detach().reshape(())
    out.update({f"grad.critic.{n}": p.grad.detach().clone() for n, p in critic.named_parameters()})

    critic.zero_grad()
    generator.zero_grad()
    generator_loss = -critic(generator(noise, labels), labels).mean()
    generator_loss.backward()
    out["generator.loss"] = generator_loss.detach().reshape(())
    out.update({f"grad.generator.{n}": p.grad.detach().clone() for n, p in generator.named_parameters()})

    path = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "worker", "tests", "fixtures", "cwgan_reference.safetensors"))
    safetensors_io.save(out, path)
    print(f"conditional: critic loss {critic_loss.item():.6f} (penalty {penalty.item():.6f}), generator loss {generator_loss.item():.6f}")


if __name__ == "__main__":
    main()
