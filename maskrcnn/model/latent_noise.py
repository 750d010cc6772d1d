"""LatentNoise: a pluggable perturbation of a dict of feature tensors. The model applies it at one site
(`MaskRCNN.noise_site`): the bottom-up features before the FPN ("prior to the RPN", the default), the FPN's
outputs, or the pooled RoI features before the box and mask heads.

Identity unless enabled. The default settings are the preset `LatentNoise.uniform_c5_per_position()`: c5 multiplied
by U(0.8, 1.2), one value per spatial position shared over batch and channels, in training only.

Shapes: features {name: [N, C, H, W]} (bottom-up c2..c5, FPN p2..p6, or pooled RoIs {"box": [R, C, 7, 7],
"mask": [F, C, 14, 14]}, where N counts RoIs); noise tensors broadcast to these:
element [N, C, H, W] | position [1, 1, H, W] | channel [1, C, 1, 1].
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

MODES = ("multiplicative", "additive")
DISTRIBUTIONS = ("uniform", "gaussian")
SHAPES = ("element", "position", "channel")


class LatentNoise(nn.Module):
    def __init__(
        self,
        *,
        enabled: bool = False,
        levels: Sequence[str] = ("c5",),
        mode: str = "multiplicative",
        distribution: str = "uniform",
        strength: float = 0.2,
        shape: str = "position",
        train_only: bool = True,
        seed: Optional[int] = None,
    ):
        super().__init__()
        for name, value, options in (("mode", mode, MODES), ("distribution", distribution, DISTRIBUTIONS),
                                     ("shape", shape, SHAPES)):
            if value not in options:
                raise ValueError(f"LatentNoise {name} '{value}' not one of {options}")
        if strength < 0:
            raise ValueError(f"LatentNoise strength must be >= 0, got {strength}")
        self.enabled = enabled
        self.levels = tuple(levels)
        self.mode = mode
        self.distribution = distribution
        self.strength = float(strength)
        self.shape = shape
        self.train_only = train_only
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    @classmethod
    def uniform_c5_per_position(cls, seed: Optional[int] = None) -> "LatentNoise":
        """The default noise: c5 x U(0.8, 1.2), one value per position, training only."""
        return cls(enabled=True, levels=("c5",), mode="multiplicative", distribution="uniform",
                   strength=0.2, shape="position", train_only=True, seed=seed)

    def _generator(self, device: torch.device) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        if device not in self._generators:  # one stream per device, seeded once: runs repeat
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def reset(self) -> None:
        """Restart the seeded noise stream."""
        self._generators.clear()

    def get_state(self) -> dict[str, Tensor]:
        """The state of each seeded generator drawn from so far, {device name: uint8 state tensor} ({} when
        the module draws from the global RNG). With `set_state`, a resumed run continues the same stream."""
        return {str(device): gen.get_state() for device, gen in self._generators.items()}

    def set_state(self, states: dict[str, Tensor]) -> None:
        """Restore generator states from `get_state` (the streams not named restart from the seed)."""
        if states and self.seed is None:
            raise ValueError("LatentNoise.set_state: this module has no seed, so no generator of its own")
        self._generators.clear()
        for name, state in states.items():
            device = torch.device(name)
            gen = torch.Generator(device=device)
            gen.set_state(state.cpu() if torch.is_tensor(state) else torch.tensor(state, dtype=torch.uint8))
            self._generators[device] = gen

    def sample(self, x: Tensor) -> Tensor:
        """Zero-mean noise n of the configured shape for features x [N, C, H, W] (fp32)."""
        n, c, h, w = x.shape
        size = {"element": (n, c, h, w), "position": (1, 1, h, w), "channel": (1, c, 1, 1)}[self.shape]
        gen = self._generator(x.device)
        if self.distribution == "uniform":
            noise = torch.rand(size, generator=gen, device=x.device) * 2 - 1
        else:
            noise = torch.randn(size, generator=gen, device=x.device)
        return noise * self.strength

    def active(self) -> bool:
        return self.enabled and self.strength > 0 and (self.training or not self.train_only)

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """{name: [N, C, H, W]} -> the same keys and shapes; the ones among `levels` are perturbed. (Which names a
        site passes is checked when the model is built: the RoI site passes "box" and "mask" in separate calls.)"""
        if not self.active():
            return features
        out = dict(features)
        for level in self.levels:
            if level not in features:
                continue
            x = features[level]
            noise = self.sample(x)
            if self.mode == "multiplicative":
                out[level] = x * (1 + noise).to(x.dtype)
            else:  # additive, relative to the feature's own spread so `strength` means the same at every level
                out[level] = x + noise.to(x.dtype) * x.detach().float().std().to(x.dtype)
        return out

    def describe(self) -> str:
        """The settings, whether or not it is enabled (what probe(noise=True) switches on)."""
        return (f"levels={self.levels}, mode={self.mode}, distribution={self.distribution}, "
                f"strength={self.strength}, shape={self.shape}, train_only={self.train_only}, seed={self.seed}")

    def extra_repr(self) -> str:
        return self.describe() if self.enabled else "enabled=False (identity)"
