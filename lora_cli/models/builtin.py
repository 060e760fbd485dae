"""The small built-in architectures: ``linear``, ``mlp`` and ``gpt``.

They need nothing downloaded and have stable, readable module names, so LoRA targets
like ``linear``, ``layers.0`` or ``q_proj`` mean the same thing in every run:

    linear   LinearModel   linear                                   (B, F) -> (B, out)
    mlp      MLP           layers.0 .. layers.{n-1}, head           (B, F) -> (B, out)
    gpt      GPT           layers.N.self_attn.{q,k,v,o}_proj,       (B, T) -> (B, T, vocab)
                           layers.N.mlp.{gate,up,down}_proj, lm_head

``ARCHS`` maps the ``model.arch`` name of a config to the class; its keyword arguments
are ``model.args``.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import choices
from ..errors import ModelError
from .gpt import GPT, check_sizes

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


class LinearModel(nn.Module):
    """``y = x W^T + b``: one ``nn.Linear`` named ``linear`` (the textbook LoRA example)."""

    def __init__(self, in_features: int, out_features: int = 1, bias: bool = True):
        super().__init__()
        check_sizes(in_features=in_features, out_features=out_features)
        self.linear = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, F)
        return self.linear(x)                              # (B, out)


class MLP(nn.Module):
    """A feed-forward regressor/classifier: ``layers`` hidden Linear+activation, then ``head``.

    With ``layers=2`` the Linear modules are ``layers.0`` (in -> hidden),
    ``layers.1`` (hidden -> hidden) and ``head`` (hidden -> out); with ``layers=0`` the
    model is just ``head`` (in -> out).
    """

    def __init__(self, in_features: int, out_features: int = 1, hidden: int = 64, layers: int = 2,
                 activation: str = "gelu", bias: bool = True):
        super().__init__()
        check_sizes(in_features=in_features, out_features=out_features, hidden=hidden)
        check_sizes(minimum=0, layers=layers)
        if activation not in ACTIVATIONS:
            raise ModelError(
                f"unknown activation {activation!r}",
                where="model.args.activation",
                fix=f"use one of: {', '.join(ACTIVATIONS)}",
            )
        sizes = [in_features] + [hidden] * layers
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = ACTIVATIONS[activation]()
        self.head = nn.Linear(sizes[-1], out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, F)
        for layer in self.layers:
            x = self.act(layer(x))                         # (B, hidden)
        return self.head(x)                                # (B, out)


ARCHS = dict(zip(choices.ARCHS, (LinearModel, MLP, GPT)))   # the names a config may give model.arch
