"""PyTorch reference for the seed's WGAN-GP (report §2.3) at reduced width.

Writes worker/tests/fixtures/wgan_reference.safetensors: generator and critic weights and
buffers (`generator.*`, `critic.*`, named as in the Rust model), a real batch, the noise, the
interpolation coefficients, the critic loss with its gradient penalty (λ = 10) and every critic
gradient (double backward), and the generator loss and every generator gradient.
The Rust test worker/tests/reference.rs must match.

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


class Generator(nn.Module):
    def __init__(self, widths):
        super().__init__()
        ch = [100, *widths, 1]
        for i in range(5):
            first = i == 0
            conv = nn.ConvTranspose2d(ch[i], ch[i + 1], 4, stride=1 if first else 2, padding=0 if first else 1, bias=i == 4)
            setattr(self, f"deconv{i + 1}", conv)
        for i in range(4):
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(ch[i + 1]))

    def forward(self, z):
        x = z.view(-1, 100, 1, 1)
        for i in range(4):
            x = torch.relu(getattr(self, f"bn{i + 1}")(getattr(self, f"deconv{i + 1}")(x)))
        return torch.tanh(self.deconv5(x))


class Critic(nn.Module):
    def __init__(self, widths):
        super().__init__()
        ch = [1, widths[3], widths[2], widths[1], widths[0], 1]
        for i in range(5):
            last = i == 4
            conv = nn.Conv2d(ch[i], ch[i + 1], 4, stride=1 if last else 2, padding=0 if last else 1, bias=i in (0, 4))
            setattr(self, f"conv{i + 1}", conv)
        for i in range(1, 4):
            setattr(self, f"in{i + 1}", nn.InstanceNorm2d(ch[i + 1], affine=True))

    def forward(self, x):
        x = nn.functional.leaky_relu(self.conv1(x), 0.2)
        for i in range(1, 4):
            x = nn.functional.leaky_relu(getattr(self, f"in{i + 1}")(getattr(self, f"conv{i + 1}")(x)), 0.2)
        return self.conv5(x).view(-1)


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


if __name__ == "__main__":
    main()
