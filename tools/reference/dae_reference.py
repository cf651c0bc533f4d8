"""PyTorch reference for the seed's DAE (report §1.2) and one Adam step.

Writes worker/tests/fixtures/dae_reference.safetensors: the weights (`model.*`, named as in the
Rust model), a clean and a noisy batch, the MSE loss, every gradient (`grad.*`) and the weights
after one torch.optim.Adam step with L2 weight decay (`after.*`). The Rust test
worker/tests/reference.rs loads the same weights and must match.

Run: .venv/bin/python tools/reference/dae_reference.py
"""

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import safetensors_io  # noqa: E402

LR, WEIGHT_DECAY, BETAS, EPS = 1e-3, 1e-5, (0.9, 0.999), 1e-8


class Encoder(nn.Module):
    def __init__(self, latent: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(16, 32, 3, stride=2, padding=0)
        self.fc1 = nn.Linear(288, 64)
        self.fc2 = nn.Linear(64, latent)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class Decoder(nn.Module):
    def __init__(self, latent: int):
        super().__init__()
        self.fc1 = nn.Linear(latent, 64)
        self.fc2 = nn.Linear(64, 288)
        self.deconv1 = nn.ConvTranspose2d(32, 16, 3, stride=2, padding=0, output_padding=0)
        self.deconv2 = nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1)
        self.deconv3 = nn.ConvTranspose2d(8, 1, 3, stride=2, padding=1, output_padding=1)

    def forward(self, z):
        x = torch.relu(self.fc2(torch.relu(self.fc1(z)))).view(-1, 32, 3, 3)
        x = torch.relu(self.deconv1(x))
        x = torch.relu(self.deconv2(x))
        return torch.sigmoid(self.deconv3(x))


class Dae(nn.Module):
    def __init__(self, latent: int = 4):
        super().__init__()
        self.encoder = Encoder(latent)
        self.decoder = Decoder(latent)

    def forward(self, x):
        return self.decoder(self.encoder(x))


def main() -> None:
    torch.manual_seed(1234)
    model = Dae(4)
    clean = torch.rand(8, 1, 28, 28)
    noisy = clean + 0.3 * torch.randn_like(clean)
    out = {f"model.{name}": p.detach().clone() for name, p in model.named_parameters()}
    out["input.clean"], out["input.noisy"] = clean, noisy

    optimizer = torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, foreach=False)
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(noisy), clean)
    loss.backward()
    out["loss"] = loss.detach().reshape(())
    out.update({f"grad.{name}": p.grad.detach().clone() for name, p in model.named_parameters()})
    optimizer.step()
    out.update({f"after.{name}": p.detach().clone() for name, p in model.named_parameters()})

    path = os.path.join(os.path.dirname(__file__), "..", "..", "worker", "tests", "fixtures", "dae_reference.safetensors")
    safetensors_io.save(out, os.path.normpath(path))
    print(f"loss {loss.item():.6f}; wrote {os.path.normpath(path)}")


if __name__ == "__main__":
    main()
