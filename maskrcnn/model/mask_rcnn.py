"""Mask R-CNN (and its RPN-only first stage) as a short sequence of stages.

    images -> transform -> bottom_up -> [noise] -> fpn -> [noise] -> rpn -> roi_heads ([noise] on the pooled RoI
    features) -> losses | detections

LatentNoise sits at one of the sites in brackets (`noise_site`: "bottom_up", the default, "fpn" or "roi"); it is
the identity unless enabled. A new site is a name in NOISE_SITES, its outputs in `site_outputs` and one
`self._noise_at(name, tensors, record)` where its tensors pass, all in this file (build.py checks the configured
levels against `site_outputs`).

Shapes: N images; inputs list of [3, Hi, Wi] float 0..1 RGB; targets list of dict(boxes [M, 4] xyxy px,
labels [M] int64 1..K, masks [M, Hi, Wi] uint8). Training returns {loss name: scalar}; inference returns per
image dict(boxes [D, 4], labels [D], scores [D], masks [D, 1, Hi, Wi] probabilities) in input pixels, or, for
the RPN stage, dict(boxes [P, 4], scores [P]) proposals in input pixels.

`probe()` runs the same pass and returns every intermediate result (see its docstring): pictures, reports
and the TensorBoard images are drawn from it, never from a copy of this chain.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .backbone import ResNetBottomUp
from .fpn import FPN
from .latent_noise import LatentNoise
from .postprocess import PASTE_MODES, postprocess_detections
from .roi_heads import RoIHeads
from .rpn import RPN
from .transform import ImageList, ImageTransform, resize_boxes


# Where LatentNoise can sit: after the bottom-up pathway (c2..c5, "prior to the RPN"), after the FPN (p2..p6), or
# on the pooled RoI features before the box and mask heads ("box", "mask").
NOISE_SITES = ("bottom_up", "fpn", "roi")
DEFAULT_NOISE_LEVELS = {"bottom_up": ["c5"]}  # uniform_c5_per_position; at the other sites: every output


class MaskRCNN(nn.Module):
    def __init__(self, *, transform: ImageTransform, bottom_up: ResNetBottomUp, noise: LatentNoise, fpn: FPN,
                 rpn: RPN, roi_heads: Optional[RoIHeads] = None, mask_paste: str = "bilinear",
                 noise_site: str = "bottom_up"):
        super().__init__()
        self.transform = transform
        self.bottom_up = bottom_up
        self.noise = noise
        if noise_site not in NOISE_SITES:
            raise ValueError(f"unknown noise site '{noise_site}' (one of: {', '.join(NOISE_SITES)})")
        self.noise_site = noise_site  # where `noise` is applied (its levels are checked by build_model)
        self.fpn = fpn
        self.rpn = rpn
        self.roi_heads = roi_heads  # None: the RPN stage
        if mask_paste not in PASTE_MODES:
            raise ValueError(f"unknown mask paste mode '{mask_paste}' ({' | '.join(PASTE_MODES)})")
        self.mask_paste = mask_paste  # how masks are pasted into the input image (postprocess.py)

    @property
    def stage(self) -> str:
        return "rpn" if self.roi_heads is None else "full"

    @staticmethod
    def site_outputs(site: str, bottom_up: ResNetBottomUp, fpn: FPN, roi_heads: Optional[RoIHeads]) -> list[str]:
        """The names of the tensors that pass a noise site: LatentNoise's levels there must be among them."""
        if site == "bottom_up":
            return list(bottom_up.out_channels)
        if site == "fpn":
            return list(fpn.out_features)
        if site == "roi":
            return [name for name, _, _ in roi_heads.heads()] if roi_heads is not None else []
        raise ValueError(f"unknown noise site '{site}' (one of: {', '.join(NOISE_SITES)})")

    def _noise_at(self, site: str, tensors: dict[str, Tensor], record: Optional[dict]) -> dict[str, Tensor]:
        """LatentNoise applied to `tensors` if it sits at `site` (else they pass unchanged); the probe record
        gets them before and after under "noise"."""
        if site != self.noise_site:
            return tensors
        out = self.noise(tensors)
        if record is not None:
            seen = record.setdefault("noise", {"site": site, "active": self.noise.active(), "before": {},
                                               "after": {}})
            seen["before"].update(tensors)
            seen["after"].update(out)
        return out

    def _roi_noise(self, record: Optional[dict]) -> Optional[Callable[[str, Tensor], Tensor]]:
        """The RoI heads' hook on each head's pooled features, when the noise sits there."""
        if self.noise_site != "roi":
            return None
        return lambda name, x: self._noise_at("roi", {name: x}, record)[name]

    def features(self, images: list[Tensor], targets: Optional[list[dict]] = None, record: Optional[dict] = None):
        """Transform and features: (ImageList, targets in the resized frame, {"p2".."p6"} as the RPN sees them)."""
        image_list, targets = self.transform(images, targets)
        bottom_up = self.bottom_up(image_list.tensor)
        noisy = self._noise_at("bottom_up", bottom_up, record)
        feats = self._noise_at("fpn", self.fpn(noisy), record)
        if record is not None:
            record.update(images=self.input_images(image_list), image_sizes=image_list.image_sizes,
                          padded_size=tuple(image_list.tensor.shape[-2:]), targets=targets,
                          bottom_up=bottom_up, noisy=noisy, fpn=feats)
        return image_list, targets, feats

    def forward(self, images: list[Tensor], targets: Optional[list[dict]] = None, record: Optional[dict] = None,
                stats: Optional[dict] = None):
        """Losses (training) or detections (eval). `record`: a dict that receives every intermediate result
        (see probe); None in ordinary training and inference. `stats` (training): a dict that receives the
        stages' training statistics, name -> [2] (numerator, denominator) from the tensors the losses use
        (maskrcnn.engine.step.train_step sums and divides them)."""
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, targets, feats = self.features(images, targets, record)
        proposals, losses = self.rpn(image_list, feats, targets, record, stats)
        if self.roi_heads is None:
            if self.training:
                return losses
            return [{"boxes": resize_boxes(p["boxes"], size, orig), "scores": p["scores"]}
                    for p, size, orig in zip(proposals, image_list.image_sizes, original_sizes)]
        detections, head_losses = self.roi_heads(feats, [p["boxes"] for p in proposals],
                                                 image_list.image_sizes, targets, record, self._roi_noise(record),
                                                 stats)
        if self.training:
            return {**losses, **head_losses}
        if record is not None:
            record["detections"] = detections
        return postprocess_detections(detections, image_list.image_sizes, original_sizes, self.mask_paste)

    @torch.no_grad()
    def probe(self, images: list[Tensor], targets: Optional[list[dict]] = None, noise: Optional[bool] = None,
              heads: bool = True) -> dict:
        """One pass of forward (in the model's current mode, without gradients) that returns every intermediate
        result; with targets in eval mode the RPN's anchor labelling and the RoI sampling run too, on the
        test-time proposals. Keys (N images, level lists fine to coarse):
          images           list of [3, h, w] float 0..1: each image as the model sees it (resized, unpadded)
          image_sizes      [(h, w)]; padded_size (Hp, Wp)
          targets          the targets in the model-input frame (None without targets)
          bottom_up        {"c2".."c5"}; noisy: the same after the bottom_up noise site; fpn: {"p2".."p6"} as the
                           RPN sees them (after the fpn noise site)
          noise            dict(site, active, before, after): the tensors at the noise site without and with the
                           noise (the roi site: "box" and "mask", pooled RoI features of the batch)
          anchors          list per level of [Ai, 4]; objectness: list per level of [N, Ai] logits;
                           rpn_deltas: list per level of [N, Ai, 4] box deltas of each anchor
          anchor_labels    [N, Atot] 1 / 0 / -1 (positive, negative, ignored); sampled_anchor_labels: the same
                           after sampling (-1: not sampled); anchor_matched_boxes [N, Atot, 4]: the GT box
                           each anchor is matched with (its regression target's box)       (with targets)
          pre_nms          per image dict(boxes, scores, levels, anchor_index): the RPN's per-level top-k
                           anchors, decoded and clipped, before its filters and NMS
          proposals        per image dict(boxes [P, 4], scores [P], levels [P]) in the model-input frame
          roi_samples      per image dict(boxes, labels, matched_idx)              (full stage, with targets)
          box_refinement   per image dict(proposals, class_logits [P, K+1], box_deltas [P, 4(K+1)], steps):
                           steps "class_boxes" -> "score_threshold" -> "nms" -> "top_k", each dict(boxes,
                           scores, labels, roi: index of the proposal)      (full stage, eval mode, see BoxHead)
          mask_logits      per image [D, M, M]: each detection's class logits before the sigmoid
          detections       per image dict(boxes, scores, labels, masks [D, 1, M, M]) in the model-input frame,
                           before the paste                                      (full stage, eval mode)
          output           what forward returns: losses (training) or detections/proposals in input pixels
        `noise`: None: LatentNoise as configured and as the mode says; True: the configured noise switched on and
        applied as in training (even where the config has it off: the features view); False: skipped.
        `heads=False`: the pass ends after the RPN, as the RPN stage's (for proposal statistics, cheaper)."""
        record: dict = {}
        was_training, was_enabled, roi_heads = self.noise.training, self.noise.enabled, self.roi_heads
        try:
            if noise is not None:
                self.noise.train(noise)
                self.noise.enabled = noise
            if not heads:
                self.roi_heads = None
            record["output"] = self(images, targets, record)
        finally:
            self.noise.train(was_training)
            self.noise.enabled = was_enabled
            self.roi_heads = roi_heads
        return record

    def input_images(self, image_list: ImageList) -> list[Tensor]:
        """Each image of the batch as the model sees it (resized, unpadded), un-normalised to 0..1."""
        t = self.transform
        return [(image_list.tensor[i, :, :h, :w].float() * t.pixel_std + t.pixel_mean).clamp(0, 1)
                for i, (h, w) in enumerate(image_list.image_sizes)]

    # ------------------------------------------------------------------ random state (the trainer's checkpoints)
    def rng_state(self) -> dict[str, dict[str, Tensor]]:
        """The state of the model's own random generators, {module name: LatentNoise.get_state()}: a checkpoint
        holds it beside the global RNGs (maskrcnn.engine.rng), so a resumed run draws the same noise."""
        return {n: m.get_state() for n, m in self.named_modules() if isinstance(m, LatentNoise)}

    def set_rng_state(self, states: dict[str, dict[str, Tensor]]) -> list[str]:
        """Restore `rng_state`; returns the generators named there that this model does not have."""
        modules, missing = dict(self.named_modules()), []
        for name, state in states.items():
            if isinstance(modules.get(name), LatentNoise):
                modules[name].set_state(state)
            else:
                missing.append(f"LatentNoise generator {name!r}")
        return missing
