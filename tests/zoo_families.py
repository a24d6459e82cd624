"""Correct, tiny look-alikes of the common BN architecture families (no torchvision/timm).

Each factory returns a model for (N, 3, 16, 16) inputs (``mlp_head``: (N, 12)) whose BN usage
is right, so a bncheck audit must report no error on it, fresh or trained, in train or eval
mode. ``FAMILIES`` maps a name to ``(factory, input_shape)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


# ---- ResNet ----------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = None
        if stride != 1 or c_in != c:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, c: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c * 2, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c * 2)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(
            nn.Conv2d(c_in, c * 2, 1, stride, bias=False), nn.BatchNorm2d(c * 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))


class ResNet(nn.Module):
    def __init__(
        self,
        block: str = "basic",
        zero_init_residual: bool = False,
        norm: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        if block == "basic":
            self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, 2))
            width = 16
        else:
            self.layer1 = nn.Sequential(Bottleneck(8, 4), Bottleneck(8, 8, 2))
            width = 16
        self.fc = nn.Linear(width, 5)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)
                elif isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---- pre-activation ResNet (BN after an add) -------------------------------------------------
class PreActBlock(nn.Module):
    def __init__(self, c_in: int, c: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c:
            self.shortcut = nn.Conv2d(c_in, c, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.layers = nn.Sequential(PreActBlock(8, 8), PreActBlock(8, 8), PreActBlock(8, 16, 2))
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.fc(out.mean((2, 3)))


# ---- DenseNet (BN-ReLU-conv on concatenated features) ----------------------------------------
class DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm0 = nn.BatchNorm2d(8)
        self.layers = nn.ModuleList([DenseLayer(8), DenseLayer(12), DenseLayer(16)])
        self.transition = nn.Sequential(
            nn.BatchNorm2d(20),
            nn.ReLU(inplace=True),
            nn.Conv2d(20, 10, 1, bias=False),
            nn.AvgPool2d(2),
        )
        self.norm5 = nn.BatchNorm2d(10)
        self.fc = nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [F.relu(self.norm0(self.conv0(x)), inplace=True)]
        for layer in self.layers:
            features.append(layer(features))
        x = self.transition(torch.cat(features, 1))
        x = F.relu(self.norm5(x), inplace=True)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ---- MobileNetV3 / EfficientNet (eps 1e-3, momentum 0.01, Hardswish / SiLU, SE) ----------------
def conv_bn_act(
    c_in: int,
    c: int,
    k: int = 3,
    stride: int = 1,
    groups: int = 1,
    act: type[nn.Module] | None = nn.Hardswish,
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c, eps=1e-3, momentum=0.01),
    ]
    if act is not None:
        layers.append(act(inplace=True) if act in (nn.Hardswish, nn.SiLU, nn.ReLU) else act())
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, max(2, c // 4), 1)
        self.act = act()
        self.fc2 = nn.Conv2d(max(2, c // 4), c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(self.act(self.fc1(s))))


class InvertedResidual(nn.Module):
    def __init__(self, c: int, expand: int, act: type[nn.Module]) -> None:
        super().__init__()
        hidden = c * expand
        self.block = nn.Sequential(
            conv_bn_act(c, hidden, 1, act=act),
            conv_bn_act(hidden, hidden, 3, groups=hidden, act=act),
            SqueezeExcite(hidden, nn.ReLU),
            conv_bn_act(hidden, c, 1, act=None),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class MobileNetLike(nn.Module):
    def __init__(self, act: type[nn.Module] = nn.Hardswish) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_act(3, 8, 3, 2, act=act),
            InvertedResidual(8, 2, act),
            InvertedResidual(8, 2, act),
        )
        self.classifier = nn.Sequential(nn.Linear(8, 16), act(), nn.Dropout(0.2), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


# ---- Inception (BasicConv2d with eps 1e-3, concatenated branches) -----------------------------
class BasicConv2d(nn.Module):
    def __init__(self, c_in: int, c: int, **kw: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c, bias=False, **kw)
        self.bn = nn.BatchNorm2d(c, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class InceptionLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = BasicConv2d(3, 8, kernel_size=3, padding=1)
        self.b1 = BasicConv2d(8, 4, kernel_size=1)
        self.b3 = nn.Sequential(
            BasicConv2d(8, 4, kernel_size=1), BasicConv2d(4, 4, kernel_size=3, padding=1)
        )
        self.pool_proj = BasicConv2d(8, 4, kernel_size=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        pooled = F.avg_pool2d(x, 3, 1, 1)
        x = torch.cat([self.b1(x), self.b3(x), self.pool_proj(pooled)], 1)
        return self.fc(x.mean((2, 3)))


# ---- FrozenBatchNorm2d and BatchNormAct2d look-alikes -------------------------------------------
class FrozenBatchNorm2d(nn.Module):
    """torchvision's FrozenBatchNorm2d: statistics and affine as buffers, no counter."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


def frozen_resnet() -> nn.Module:
    """A ResNet backbone with FrozenBatchNorm2d everywhere (detection style), stats set."""
    model = ResNet("basic")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features)
                g = torch.Generator().manual_seed(len(name) + len(child_name))
                frozen.running_mean.copy_(0.1 * torch.randn(child.num_features, generator=g))
                frozen.running_var.copy_(0.5 + torch.rand(child.num_features, generator=g))
                frozen.weight.copy_(1 + 0.1 * torch.randn(child.num_features, generator=g))
                setattr(module, child_name, frozen)
    return model


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style BN + activation in one module (activation applied inside forward)."""

    def __init__(self, num_features: int, act: type[nn.Module] = nn.ReLU, **kw: float) -> None:
        super().__init__(num_features, **kw)
        self.drop = nn.Identity()
        self.act = act(inplace=True) if act in (nn.ReLU, nn.SiLU) else act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or self.running_mean is None
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            factor,
            self.eps,
        )
        return self.act(self.drop(x))


class BNActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = BatchNormAct2d(8, act=nn.SiLU, momentum=None)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn2(self.conv2(self.bn1(self.conv1(x)))).mean((2, 3)))


# ---- MLP head with BatchNorm1d ---------------------------------------------------------------
class MLPHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 16, bias=False)
        self.bn1 = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 16, bias=False)
        self.bn2 = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.fc1(x)))
        x = self.bn2(self.fc2(x)).relu_()
        return self.out(self.drop(x))


# ---- selective-kernel / split attention (BN on 1x1 pooled maps) --------------------------------
class SKAttention(nn.Module):
    """timm's SelectiveKernel / ResNeSt split attention: two branches, their sum pooled to
    (N, C, 1, 1), a 1x1 conv + BN + ReLU on that 1x1 map, softmax weights per branch."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.paths = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(c, c, 3, padding=d, dilation=d, bias=False),
                    nn.BatchNorm2d(c),
                    nn.ReLU(inplace=True),
                )
                for d in (1, 2)
            ]
        )
        self.fc_reduce = nn.Conv2d(c, 8, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.fc_select = nn.Conv2d(8, 2 * c, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths = torch.stack([p(x) for p in self.paths], 1)  # (N, 2, C, H, W)
        attn = self.act(self.bn(self.fc_reduce(paths.sum(1).mean((2, 3), keepdim=True))))
        attn = self.fc_select(attn).view(x.shape[0], 2, -1, 1, 1).softmax(1)
        return (paths * attn).sum(1)


class SKNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        )
        self.sk = SKAttention(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.fc((x + self.sk(x)).mean((2, 3)))


# ---- ShuffleNetV2 (channel split, depthwise conv + BN without activation, shuffle) ------------
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        half = c // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False),  # depthwise
            nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((a, self.branch(b)), 1), 2)


class ShuffleNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        )
        self.stage = nn.Sequential(ShuffleUnit(8), ShuffleUnit(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stage(self.conv1(x)).mean((2, 3)))


# ---- DeepLabV3 ASPP head (image-pooling branch: BN on a 1x1 map) -----------------------------
class ASPP(nn.Module):
    def __init__(self, c_in: int, c: int = 8) -> None:
        super().__init__()

        def branch(k: int, d: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c, k, padding=d * (k // 2), dilation=d, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(),
            )

        self.convs = nn.ModuleList([branch(1, 1), branch(3, 2), branch(3, 3)])
        self.pooling = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(c_in, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()
        )
        self.project = nn.Sequential(
            nn.Conv2d(4 * c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.Dropout(0.5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [conv(x) for conv in self.convs]
        outs.append(F.interpolate(self.pooling(x), size=x.shape[-2:], mode="bilinear"))
        return self.project(torch.cat(outs, 1))


class SegmentationLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        )
        self.aspp = ASPP(8)
        self.classifier = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.classifier(self.aspp(self.backbone(x)))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear")


# ---- LeViT-style tokens with BatchNorm1d over (B * tokens, C), and a BN1d head ---------------
class LinearNorm(nn.Module):
    """LeViT's Linear + BatchNorm1d on flattened tokens."""

    def __init__(self, c_in: int, c: int) -> None:
        super().__init__()
        self.c = nn.Linear(c_in, c, bias=False)
        self.bn = nn.BatchNorm1d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LeViTLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Sequential(
            nn.Conv2d(3, 8, 4, 4, bias=False), nn.BatchNorm2d(8), nn.Hardswish()
        )
        self.mlp = nn.Sequential(LinearNorm(8, 16), nn.Hardswish(), LinearNorm(16, 8))
        self.head_bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, tokens, C)
        x = x + self.mlp(x)
        return self.head(self.head_bn(x.mean(1)))


# ---- timm-style zero_init_last on bottleneck blocks ------------------------------------------
def zero_init_last_resnet() -> nn.Module:
    """timm's ``zero_init_last``: the last BN of every bottleneck starts with gamma = 0."""
    model = ResNet("bottleneck")
    for m in model.modules():
        if isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)
    return model


IMAGE = (3, 16, 16)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet_basic": (lambda: ResNet("basic"), IMAGE),
    "resnet_bottleneck": (lambda: ResNet("bottleneck"), IMAGE),
    "resnet_zero_init_residual": (lambda: ResNet("basic", zero_init_residual=True), IMAGE),
    "preact_resnet": (PreActResNet, IMAGE),
    "densenet": (DenseNet, IMAGE),
    "mobilenet_v3": (lambda: MobileNetLike(nn.Hardswish), IMAGE),
    "efficientnet": (lambda: MobileNetLike(nn.SiLU), IMAGE),
    "inception": (InceptionLike, IMAGE),
    "frozen_bn_resnet": (frozen_resnet, IMAGE),
    "bn_act": (BNActNet, IMAGE),
    "mlp_head": (MLPHead, (12,)),
    "sk_attention": (SKNet, IMAGE),
    "shufflenet": (ShuffleNetLike, IMAGE),
    "aspp_segmentation": (SegmentationLike, IMAGE),
    "levit_bn1d": (LeViTLike, IMAGE),
    "zero_init_last_bottleneck": (zero_init_last_resnet, IMAGE),
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[name][0]()


def batch(name: str, n: int = 8, seed: int = 1) -> torch.Tensor:
    shape = FAMILIES[name][1]
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def populate(model: nn.Module, x: torch.Tensor, forwards: int = 3) -> nn.Module:
    """Train-mode forwards and no optimizer step: the statistics move, the weights do not
    (zero-initialised gamma stays exactly zero)."""
    model.train()
    with torch.no_grad():
        for _ in range(forwards):
            model(x)
    return model


def train_steps(model: nn.Module, x: torch.Tensor, steps: int = 3) -> nn.Module:
    """A few SGD steps in train mode on random targets (moves weights and statistics)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    target = torch.arange(x.shape[0]) % 3
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        out = out.flatten(2).mean(2) if out.dim() > 2 else out  # segmentation: pooled logits
        loss = F.cross_entropy(out[:, :3], target)
        loss.backward()
        opt.step()
    return model
