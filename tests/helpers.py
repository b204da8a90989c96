"""Small models and loops shared by the tests."""

from __future__ import annotations

import torch
from torch import nn

import rigl_ds


class TinyLM(nn.Module):
    """Embedding -> two hidden Linear layers -> vocabulary head (the head and embedding stay dense)."""

    def __init__(self, vocab: int = 40, width: int = 48, hidden: int = 96):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(self.embed(x))))))


def task(vocab: int = 40, n: int = 64, seed: int = 0):
    """A learnable mapping: each token predicts a fixed other token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n,), generator=g)
    return x, (x * 7 + 3) % vocab


def make(config: dict, optimizer: str = "adam", seed: int = 0, total_steps: int = 300, lr: float = 1e-2):
    torch.manual_seed(seed)
    model = TinyLM()
    opt = {
        "adam": lambda p: torch.optim.Adam(p, lr=lr),
        "adamw": lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.1),
        "sgd": lambda p: torch.optim.SGD(p, lr=lr * 10, momentum=0.9, weight_decay=1e-4),
    }[optimizer](model.parameters())
    sparse = rigl_ds.sparsify(model, opt, config, total_steps=total_steps)
    return model, opt, sparse


def train_step(model, opt, sparse, x, y) -> float:
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    sparse.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def layer_states(opt, param) -> dict:
    return {
        k: v.clone()
        for k, v in opt.state.get(param, {}).items()
        if isinstance(v, torch.Tensor) and v.shape == param.shape
    }
