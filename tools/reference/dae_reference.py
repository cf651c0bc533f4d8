"""PyTorch reference for the seed's DAE (report §1.2), its classifier (§1.5) and Adam.

Writes into worker/tests/fixtures/:
- dae_reference.safetensors: the weights (`model.*`, named as in the Rust model), a clean and a
  noisy batch, the MSE loss, every gradient (`grad.*`) and the weights after one
  torch.optim.Adam step with L2 weight decay (`after.*`);
- classifier_reference.safetensors: the same for the classifier (NLL loss on labels), with the
  seed's two parameter groups (encoder lr 1e-4, head lr 1e-3, weight decay 1e-5).
The Rust test worker/tests/reference.rs loads the same weights and must match.

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


class Classifier(nn.Module):
    def __init__(self, latent: int = 4):
        super().__init__()
        self.encoder = Encoder(latent)
        self.head = nn.ModuleDict({"fc1": nn.Linear(latent, 256), "fc2": nn.Linear(256, 10)})

    def forward(self, x):
        z = self.encoder(x)
        return torch.log_softmax(self.head["fc2"](torch.relu(self.head["fc1"](z))), dim=-1)


def fixture_path(name: str) -> str:
    path = os.path.join(os.path.dirname(__file__), "..", "..", "worker", "tests", "fixtures", name)
    return os.path.normpath(path)


def classifier_reference() -> None:
    torch.manual_seed(4321)
    model = Classifier(4)
    clean = torch.rand(8, 1, 28, 28)
    noisy = clean + 0.3 * torch.randn_like(clean)
    labels = torch.randint(0, 10, (8,))
    out = {f"model.{name}": p.detach().clone() for name, p in model.named_parameters()}
    out["input.noisy"], out["input.labels"] = noisy, labels
    groups = [
        {"params": list(model.encoder.parameters()), "lr": 1e-4},
        {"params": list(model.head.parameters()), "lr": 1e-3},
    ]
    optimizer = torch.optim.Adam(groups, betas=BETAS, eps=EPS, weight_decay=1e-5, foreach=False)
    optimizer.zero_grad()
    loss = nn.functional.nll_loss(model(noisy), labels)
    loss.backward()
    out["loss"] = loss.detach().reshape(())
    out.update({f"grad.{name}": p.grad.detach().clone() for name, p in model.named_parameters()})
    optimizer.step()
    out.update({f"after.{name}": p.detach().clone() for name, p in model.named_parameters()})
    safetensors_io.save(out, fixture_path("classifier_reference.safetensors"))
    print(f"classifier loss {loss.item():.6f}")


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

    safetensors_io.save(out, fixture_path("dae_reference.safetensors"))
    print(f"dae loss {loss.item():.6f}")
    classifier_reference()


if __name__ == "__main__":
    main()
