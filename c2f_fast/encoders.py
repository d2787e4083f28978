"""Image encoders: ``(a, f_fc) = encoder(images)``.

``a`` is the last convolutional feature map flattened row-major to [B, L, D] (L = h·w), ``f_fc`` the
image-level feature [B, F] (fc7 for VGG). docs/model.md, "Encoder".
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

BACKBONES = ("vgg16", "vgg16_bn", "resnet50", "resnet101", "tiny")


class VGGEncoder(nn.Module):
    """VGG-16(-BN): conv5_3 (after its ReLU, before the last max-pool) and fc7."""

    def __init__(self, vgg: nn.Module):
        super().__init__()
        layers = list(vgg.features.children())
        if not isinstance(layers[-1], nn.MaxPool2d):
            raise ValueError("expected a torchvision VGG whose features end with a max-pool")
        self.features = nn.Sequential(*layers[:-1])  # up to and including the ReLU after conv5_3
        self.pool = layers[-1]
        self.avgpool = vgg.avgpool
        self.fc = nn.Sequential(*list(vgg.classifier.children())[:-1])  # fc6, relu, drop, fc7, relu, drop
        self.feat_dim = 512
        self.fc_dim = 4096
        self.stride = 16

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.features(images)
        fc7 = self.fc(torch.flatten(self.avgpool(self.pool(fmap)), 1))
        return fmap.flatten(2).transpose(1, 2).contiguous(), fc7


class ResNetEncoder(nn.Module):
    """ResNet: layer4 as the feature map, its global average as the image feature."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.body = nn.Sequential(
            resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
            resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4,
        )
        self.feat_dim = resnet.fc.in_features
        self.fc_dim = resnet.fc.in_features
        self.stride = 32

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.body(images)
        return fmap.flatten(2).transpose(1, 2).contiguous(), fmap.mean(dim=(2, 3))


class TinyEncoder(nn.Module):
    """A small VGG-style backbone for CPU demos and tests.

    One 3x3 conv (+BN, ReLU) per stage, with a 2x2 max-pool in each of the first three, so the
    feature map is at 1/8 resolution (16x16, L = 256, at 128 px): a small object (6-20 px) then
    spans a few cells and the local attention has something to choose between (docs/data.md, "The
    built-in synthetic set"). A last conv + ReLU at that resolution gives ``a`` (as conv5_3 does),
    and the image feature is a linear layer on its max-pooled map (fc7's role). About 101 MMAC per
    128-px image (75 MMAC at stride 16), still ~8x less than two convs per stage.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), feat_dim: int = 128, fc_dim: int = 256):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for k, width in enumerate(widths):
            layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)]
            if k < len(widths) - 1:  # no pool after the last stage: stride 2**(stages - 1)
                # pooled before the ReLU: max and ReLU commute exactly (the same values and
                # gradients), and the ReLU then runs on a quarter of the map (a 1.13x faster
                # demo training step on the CPU)
                layers.append(nn.MaxPool2d(2))
            layers.append(nn.ReLU(inplace=True))
            c_in = width
        layers += [nn.Conv2d(c_in, feat_dim, 3, padding=1), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Linear(feat_dim, fc_dim), nn.ReLU(inplace=True))
        self.feat_dim = feat_dim
        self.fc_dim = fc_dim
        self.stride = 2 ** (len(widths) - 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.features(images)  # 1/8 resolution
        fc = self.fc(torch.amax(fmap, dim=(2, 3)))
        return fmap.flatten(2).transpose(1, 2).contiguous(), fc


def _torchvision_weights(backbone: str):
    import torchvision.models as tvm

    return {
        "vgg16": tvm.VGG16_Weights.IMAGENET1K_V1,
        "vgg16_bn": tvm.VGG16_BN_Weights.IMAGENET1K_V1,
        "resnet50": tvm.ResNet50_Weights.IMAGENET1K_V2,
        "resnet101": tvm.ResNet101_Weights.IMAGENET1K_V2,
    }[backbone]


def imagenet_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights, from the torch hub cache or downloaded into it.

    Never falls back to random weights: when the file is neither cached nor downloadable, the
    error says which file to place where.
    """
    weights = _torchvision_weights(backbone)
    filename = os.path.basename(weights.url)
    target = Path(torch.hub.get_dir()) / "checkpoints" / filename
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as exc:  # network errors come in many types (URLError, OSError, HTTPError...)
        raise RuntimeError(
            f"pretrained='imagenet': could not load torchvision's ImageNet weights for {backbone} "
            f"({type(exc).__name__}: {exc}). Download {weights.url} on a machine with internet "
            f"access and place it at {target} (the torch hub cache: $TORCH_HOME/hub/checkpoints, "
            f"TORCH_HOME defaults to ~/.cache/torch), or pass pretrained=None for random weights "
            f"or pretrained=<path to a state dict>."
        ) from exc


def _load_state_dict_file(path: str | os.PathLike, module: nn.Module, backbone: str) -> None:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained: no state-dict file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"pretrained: {path} is not a readable PyTorch state dict ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"pretrained: {path} does not fit the {backbone} backbone: {exc}") from exc


def is_trained_model(path: str | os.PathLike) -> bool:
    """Whether ``pretrained`` names what ``c2f train`` wrote (a run folder, a model's
    ``.safetensors`` or a training ``checkpoint.pt``) rather than a backbone's own state dict."""
    path = Path(path)
    return path.is_dir() or path.suffix == ".safetensors" or path.name == "checkpoint.pt"


def _load_trained_encoder(path: str | os.PathLike, enc: nn.Module, backbone: str) -> None:
    """The encoder weights of a trained model (see :func:`is_trained_model`): a run folder's best
    weights (else its final ones, else its checkpoint), or the file named."""
    from .checkpoint import CheckpointError, load_model

    try:
        model, meta = load_model(path, which="best")
    except CheckpointError as exc:
        raise ValueError(f"pretrained: {exc}") from None
    if meta["model"]["backbone"] != backbone:
        raise ValueError(f"pretrained: {path} holds a model with the {meta['model']['backbone']!r} backbone, "
                         f"not {backbone!r}")
    enc.load_state_dict(model.encoder.state_dict(), strict=True)


def build_encoder(backbone: str, pretrained: str | os.PathLike | None = None) -> nn.Module:
    """Build an encoder; ``pretrained`` is None (random), "imagenet", a path to a state dict, or
    a trained model (a run folder, its ``.safetensors`` or ``checkpoint.pt``: its encoder's weights).

    A state-dict path holds the backbone's own state dict (torchvision's layout for the
    torchvision backbones, ``TinyEncoder``'s for "tiny").
    """
    if backbone not in BACKBONES:
        raise ValueError(f"backbone: expected one of {BACKBONES}, got {backbone!r}")
    if pretrained is not None and pretrained != "imagenet" and is_trained_model(pretrained):
        enc = build_encoder(backbone, None)
        _load_trained_encoder(pretrained, enc, backbone)
        return enc
    if backbone == "tiny":
        enc = TinyEncoder()
        if pretrained == "imagenet":
            raise ValueError("pretrained: the 'tiny' backbone has no ImageNet weights; use None or a path")
        if pretrained is not None:
            _load_state_dict_file(pretrained, enc, backbone)
        return enc

    import torchvision.models as tvm

    net = getattr(tvm, backbone)(weights=None)
    if pretrained == "imagenet":
        net.load_state_dict(imagenet_state_dict(backbone))
    elif pretrained is not None:
        _load_state_dict_file(pretrained, net, backbone)
    return VGGEncoder(net) if backbone.startswith("vgg") else ResNetEncoder(net)


def feature_map_size(backbone: str, image_size: int) -> int:
    """Side of the (square) feature map for a square input, e.g. 14 for VGG-16 at 224 px."""
    if backbone.startswith("resnet"):
        # conv1 (stride 2, pad 3, k 7), maxpool (stride 2, pad 1, k 3), then three stride-2 stages
        side = (image_size + 2 * 3 - 7) // 2 + 1
        side = (side + 2 - 3) // 2 + 1
        for _ in range(3):
            side = (side + 2 - 3) // 2 + 1
        return side
    if backbone == "tiny":
        return image_size // 8  # three 2x2 max-pools (TinyEncoder.stride)
    return image_size // 16


__all__ = ["BACKBONES", "build_encoder", "feature_map_size", "imagenet_state_dict", "is_trained_model"]
