"""A user's own network for the ``module:function`` model source (imported by name in the tests)."""

import torch


def tiny_net():
    """A small random-weight CNN and its data config."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2))
    return net, {"input_size": (3, 48, 48), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def not_a_pair():
    return torch.nn.Identity()
