"""Bottom-up pathway: torchvision's ResNet, returning the outputs of res2..res5 as c2..c5.

Shapes: images [N, 3, H, W] -> {"c2": [N, 256, H/4, W/4], "c3": /8, "c4": /16, "c5": [N, 2048, H/32, W/32]}
(channels for depth 50/101; depth 18/34 give 64, 128, 256, 512).

Module names follow torchvision (`conv1`, `bn1`, `layer1`..`layer4`) so ImageNet and torchvision detection
weights load key for key.
"""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

LEVELS = ("c2", "c3", "c4", "c5")
_RESNETS = {18: "resnet18", 34: "resnet34", 50: "resnet50", 101: "resnet101"}
# ImageNet weights the detection references start from (torchvision's V1 weights).
_WEIGHTS = {18: "ResNet18_Weights", 34: "ResNet34_Weights", 50: "ResNet50_Weights", 101: "ResNet101_Weights"}


class WeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for but cannot be had (offline, no cached file)."""


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (buffers, not parameters)."""

    def __init__(self, *, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # present in BatchNorm checkpoints
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    folded = False  # set by model/fuse.py's fold_frozen_batchnorm_live: the preceding conv applies it

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """The normalisation as y = x * scale + shift (per channel)."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        if self.folded:
            return x
        # Folded into one scale and shift: cheaper than F.batch_norm and safe in fp16.
        scale, shift = self.scale_shift()
        return x * scale.to(x.dtype)[None, :, None, None] + shift.to(x.dtype)[None, :, None, None]

    def __repr__(self) -> str:
        return f"FrozenBatchNorm2d({self.weight.shape[0]}, eps={self.eps})"


def _norm_layer(norm: str, frozen_bn_eps: float = 1e-5) -> Callable[[int], nn.Module]:
    """The norm layer torchvision's ResNet builds as norm_layer(channels)."""
    if norm == "frozen_bn":
        return lambda c: FrozenBatchNorm2d(num_features=c, eps=frozen_bn_eps)
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return lambda c: nn.GroupNorm(32, c)
    raise ValueError(f"unknown norm '{norm}' (frozen_bn | bn | gn)")


def _freeze_batchnorm(module: nn.Module, eps: float) -> nn.Module:
    """BatchNorm layers of a frozen stage become FrozenBatchNorm2d (with `eps`), so their statistics stop moving
    too."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(num_features=module.num_features, eps=eps)
        frozen.load_state_dict(module.state_dict())
        return frozen
    for name, child in module.named_children():
        new = _freeze_batchnorm(child, eps)
        if new is not child:
            setattr(module, name, new)
    return module


STAGES = ("layer1", "layer2", "layer3", "layer4")
# model.backbone.freeze_at's stages in order: freeze_at = k freezes the first k (the stem is the first).
FREEZE_ORDER = (("conv1", "bn1"), *((name,) for name in STAGES))


def check_stages(names: Sequence[str]) -> tuple[str, ...]:
    """model.backbone.recompute's stage names in the order they run; an unknown one is a ValueError naming the
    choices."""
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ValueError(f"model.backbone.recompute: unknown stage(s) {unknown} (choose from {list(STAGES)})")
    return tuple(s for s in STAGES if s in names)


class ResNetBottomUp(nn.Module):
    def __init__(self, *, depth: int = 50, norm: str = "frozen_bn", freeze_at: int = 2, frozen_bn_eps: float = 1e-5,
                 recompute: Sequence[str] = (), recompute_under_cpu_amp: bool = False):
        super().__init__()
        # Stages run under activation checkpointing in training: their inner activations are dropped after the
        # forward and computed again in the backward pass (torch.utils.checkpoint); only the stage's input is kept.
        # The backward uses the forward's own graph with the recomputed tensors, so the gradients are the same bits.
        self.recompute = check_stages(recompute)
        # Under a CPU's autocast (bf16: train.cpu_amp) the stages run as they are unless recompute_under_cpu_amp:
        # there the activations kept are bf16 and the step was measured 6% faster without.
        self.recompute_under_cpu_amp = recompute_under_cpu_amp
        if depth not in _RESNETS:
            raise ValueError(f"ResNet depth {depth} not supported (choose from {sorted(_RESNETS)})")
        net = getattr(torchvision.models, _RESNETS[depth])(weights=None,
                                                          norm_layer=_norm_layer(norm, frozen_bn_eps))
        self.depth = depth
        self.frozen_bn_eps = frozen_bn_eps  # eps of every FrozenBatchNorm2d (torchvision's COCO weights use 0.0)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        expansion = 4 if depth >= 50 else 1
        self.out_channels = {lvl: 64 * 2**i * expansion for i, lvl in enumerate(LEVELS)}
        self.strides = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
        # The frozen stem and stages computed in channels-last memory format (fp32 on a CPU), their outputs given
        # back in the input's layout; set by model/fuse.py's frozen_as_inference (train.frozen_as_inference).
        self.frozen_channels_last = False
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> None:
        """Freeze the stem (1) and res2..res<freeze_at> (2..5): no gradients, as in detectron2."""
        for stage in FREEZE_ORDER[: max(0, freeze_at)]:
            for name in stage:
                module = _freeze_batchnorm(getattr(self, name), self.frozen_bn_eps)
                setattr(self, name, module)
                for p in module.parameters():
                    p.requires_grad_(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x [N, 3, H, W] normalised images -> {"c2".."c5"}. With frozen_channels_last, the frozen stem and stages
        (frozen_stages) run in channels-last memory format and each output comes back in x's layout."""
        frozen = self.frozen_stages() if self._frozen_in_channels_last(x) else 0
        if frozen:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        if frozen == 1:
            x = x.contiguous()
        out = {}
        for k, (level, name) in enumerate(zip(LEVELS, STAGES), start=2):  # k: freeze_at's numbering of the stages
            x = self._stage(name, x)
            if k == frozen:
                x = x.contiguous()  # the stages that train get the standard layout, as without this
            out[level] = x.contiguous() if k < frozen else x
        return out

    def frozen_stages(self) -> int:
        """How many of the stem (1) and layer1..layer4 (2..5), from the first, have no parameter that trains and no
        BatchNorm that moves its statistics: model.backbone.freeze_at's count, as the parameters say now."""
        for k, names in enumerate(FREEZE_ORDER):
            modules = [getattr(self, name) for name in names]
            if any(p.requires_grad for m in modules for p in m.parameters()) or any(
                    updates_statistics(m) for m in modules):
                return k
        return len(FREEZE_ORDER)

    def _frozen_in_channels_last(self, x: Tensor) -> bool:
        return (self.frozen_channels_last and x.device.type == "cpu" and x.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu") and x.dim() == 4
                and not x.is_contiguous(memory_format=torch.channels_last))

    def _stage(self, name: str, x: Tensor) -> Tensor:
        stage = getattr(self, name)
        if (name in self.recompute and self.training and torch.is_grad_enabled()
                and not updates_statistics(stage)
                and (self.recompute_under_cpu_amp or x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"))):
            return checkpoint(stage, x, use_reentrant=False)
        return stage(x)


def updates_statistics(module: nn.Module) -> bool:
    """Whether a forward of `module` moves BatchNorm running statistics (a BatchNorm in training mode that tracks
    them): computing it again in the backward pass would move them twice, so such a stage is not recomputed."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
               for m in module.modules())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_hub_file(path: Path, url: str = "") -> dict[str, Tensor]:
    """The state dict in a torch.hub cache file, checked before use: the SHA-256 prefix its name carries must
    match, and it is unpickled weights-only (tensors, containers, numbers: nothing that runs code) and must be
    a plain {name: tensor} dict. Any failure is a WeightsUnavailable with one line saying what to do."""
    # The cache is writable by hand (the README tells offline users to place files there), so nothing in it
    # is trusted: torch.hub itself would unpickle it with weights_only=False and check no hash once cached.
    redo = f"delete it and run again to download it, or place the right file ({url or path.name}) there"
    named = torch.hub.HASH_REGEX.search(path.name)  # "<name>-<SHA-256 prefix>.<ext>"
    if named:
        expected = named.group(1)
        actual = _sha256(path)[: len(expected)]
        if actual != expected:
            raise WeightsUnavailable(f"{path} fails its hash check: the name says SHA-256 {expected}..., the "
                                     f"file's is {actual}... (truncated or a different file); {redo}")
    return load_state_dict_file(path, redo)


def load_state_dict_file(path: Path, redo: str, unwrap: bool = False) -> dict[str, Tensor]:
    """A {name: tensor} dict from a file, unpickled weights-only (`unwrap`: a checkpoint's "model" entry when
    it has one); anything else is a WeightsUnavailable naming the file, the problem and `redo`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # not a pickle at all (a text file, a truncated download)
            raise WeightsUnavailable(f"{path} could not be read (not a PyTorch weights file); {redo}") from None
        # a global or object outside the weights-only allow-list: never executed
        raise WeightsUnavailable(f"{path} is not a plain state dict of tensors (weights-only loading refused "
                                 f"an object in it; nothing in it was run); {redo}") from None
    except Exception as e:  # truncated, not a torch file, ...
        raise WeightsUnavailable(f"{path} could not be read ({type(e).__name__}); {redo}") from None
    if unwrap and isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                              for k, v in state.items()):
        raise WeightsUnavailable(f"{path} is not a plain state dict of tensors ({type(state).__name__}); {redo}")
    return dict(state)


def fetch_torchvision_weights(enum, what: str, alternative: str = "") -> tuple[dict, str]:
    """(state dict, file name) of a torchvision weights enum, from torch.hub's cache (<hub dir>/checkpoints,
    where torchvision keeps it too), downloaded there with torch.hub's downloader when missing. Loaded by
    load_hub_file: hash-checked and weights-only. Offline without a cached file: WeightsUnavailable, one line
    naming the file and where to place it."""
    filename = Path(urlparse(enum.url).path).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not cached.is_file():
        named = torch.hub.HASH_REGEX.search(filename)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            print(f"downloading {enum.url} to {cached}", flush=True)
            # Writes to a temporary file and moves it into place only after the hash matched.
            torch.hub.download_url_to_file(enum.url, str(cached), named.group(1) if named else None, progress=False)
        except Exception as e:  # URLError, socket errors, HTTP errors, a hash mismatch: "could not download"
            detail = " ".join(str(e).split())[:160]
            raise WeightsUnavailable(f"{what} could not be downloaded ({type(e).__name__}: {detail}); "
                                     f"place {filename} ({enum.url}) at {cached}{alternative}") from None
    return load_hub_file(cached, enum.url), filename


def load_pretrained(bottom_up: ResNetBottomUp, weights: str) -> str:
    """Load ImageNet weights ("imagenet": torchvision's file, see fetch_torchvision_weights) or a local state
    dict (path, also weights-only). Returns a description of what was loaded. Offline without a cached file,
    or with a cached file that fails its checks, it raises WeightsUnavailable with one line saying what to do."""
    if weights in ("", "none"):
        return "random initialisation"
    if weights == "imagenet":
        enum = getattr(torchvision.models, _WEIGHTS[bottom_up.depth]).IMAGENET1K_V1
        state, filename = fetch_torchvision_weights(
            enum, f"ImageNet weights for ResNet-{bottom_up.depth}",
            ", or set model.backbone.weights=none (or a path to a .pth file)")
        source = f"ImageNet ({filename})"
    else:
        path = Path(weights)
        if not path.is_file():
            raise WeightsUnavailable(f"backbone weights file not found: {path} (model.backbone.weights)")
        state = load_state_dict_file(path, "check model.backbone.weights", unwrap=True)
        source = str(path)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # classifier head is not used
    own = bottom_up.state_dict()
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and v.shape != own[k].shape]
    if bad:
        raise WeightsUnavailable(f"{source} does not fit ResNet-{bottom_up.depth}: shape mismatch {bad[:3]}")
    missing, unexpected = bottom_up.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise WeightsUnavailable(
            f"{source} does not fit ResNet-{bottom_up.depth}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return source
