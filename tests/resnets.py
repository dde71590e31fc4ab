"""Seeded random ResNet CLIP models whose BatchNorms do something.

open_clip initialises every Bottleneck's last BatchNorm scale to zero and every running
statistic to (mean 0, var 1), which would make each residual branch vanish and each
BatchNorm the identity: a test on such a model could not see a stage computed wrongly.
"""

from __future__ import annotations

import pathlib

import open_clip
import torch

TINY_RN_CONFIG = pathlib.Path(__file__).parent / "data" / "tiny-RN.json"
TINY_RN = "tiny-RN"  # RN50-quickgelu shrunk: one Bottleneck per stage, width 16, 64 px (2x2 pool grid)
open_clip.add_model_config(TINY_RN_CONFIG)


def randomize_batch_norms(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Draw every BatchNorm's scale, shift and running statistics from ``seed``; returns ``model``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            width = norm.num_features
            norm.weight.copy_(0.5 + torch.rand(width, generator=generator))
            norm.bias.copy_(0.1 * torch.randn(width, generator=generator))
            norm.running_mean.copy_(0.1 * torch.randn(width, generator=generator))
            norm.running_var.copy_(0.5 + torch.rand(width, generator=generator))
    return model


def seeded_resnet(architecture: str = TINY_RN, seed: int = 0) -> torch.nn.Module:
    """open_clip ``architecture`` (a ModifiedResNet CLIP) with seeded random weights and BatchNorms, eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(architecture, pretrained=None)
    return randomize_batch_norms(model, seed).eval()
