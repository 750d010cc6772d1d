"""Box coder: the (dx, dy, dw, dh) parametrisation of R-CNN, weighted per coordinate.

Shapes: R boxes; deltas [R, 4*k] for k box predictions per box (class-specific heads give k = K).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# Largest dw/dh allowed when decoding: exp() of larger values overflows for bad early predictions.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    def __init__(self, *, weights: tuple[float, float, float, float], scale_clamp: float = DEFAULT_SCALE_CLAMP):
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def encode(self, reference: Tensor, target: Tensor) -> Tensor:
        """Deltas [R, 4] that take `reference` boxes [R, 4] to `target` boxes [R, 4]."""
        wx, wy, ww, wh = self.weights
        reference, target = reference.float(), target.float()
        rw = reference[:, 2] - reference[:, 0]
        rh = reference[:, 3] - reference[:, 1]
        rx = reference[:, 0] + 0.5 * rw
        ry = reference[:, 1] + 0.5 * rh
        tw = target[:, 2] - target[:, 0]
        th = target[:, 3] - target[:, 1]
        tx = target[:, 0] + 0.5 * tw
        ty = target[:, 1] + 0.5 * th
        return torch.stack(
            (wx * (tx - rx) / rw, wy * (ty - ry) / rh, ww * torch.log(tw / rw), wh * torch.log(th / rh)), dim=1
        )

    def decode(self, deltas: Tensor, reference: Tensor) -> Tensor:
        """Boxes [R, 4*k] from deltas [R, 4*k] applied to `reference` boxes [R, 4]. Computed in fp32."""
        deltas = deltas.float()
        reference = reference.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        widths = (reference[:, 2] - reference[:, 0])[:, None]
        heights = (reference[:, 3] - reference[:, 1])[:, None]
        cx = reference[:, 0, None] + 0.5 * widths
        cy = reference[:, 1, None] + 0.5 * heights
        dx = deltas[:, 0::4] / wx  # [R, k]
        dy = deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.scale_clamp)
        pcx = dx * widths + cx
        pcy = dy * heights + cy
        pw = torch.exp(dw) * widths
        ph = torch.exp(dh) * heights
        boxes = torch.stack((pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph), dim=2)  # [R, k, 4]
        return boxes.reshape(deltas.shape)
