"""Region Proposal Network: head, anchor labelling and sampling, losses, and proposal selection.

Shapes: N images; L FPN levels; A anchors per location; level i has Hi x Wi cells, so Ai = Hi * Wi * A
anchors; M ground-truth boxes in an image; P proposals per image after NMS.
  head:     p_i [N, C, Hi, Wi] -> objectness [N, A, Hi, Wi], deltas [N, 4A, Hi, Wi]
  flattened objectness [N, Ai], deltas [N, Ai, 4], anchors [Ai, 4] (same for every image of the batch)
  proposals: per image dict(boxes [P, 4] xyxy in the resized-image frame, scores [P] logits (or sigmoid
  probabilities with sigmoid_scores=True, as torchvision), levels [P])
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from .anchors import AnchorGenerator
from .box_coder import BoxCoder
from .box_ops import box_iou, clip_boxes, nonempty
from .losses import ratio, smooth_l1_sum
from .matcher import BELOW_LOW_THRESHOLD, Matcher
from .precision import fp32
from .sampler import BalancedSampler
from .transform import ImageList


class RPNHead(nn.Module):
    """3x3 conv + ReLU shared over levels, then 1x1 convs for A objectness logits and 4A deltas."""

    def __init__(self, *, in_channels: int, num_anchors: int, conv_dims: int = -1):
        super().__init__()
        mid = in_channels if conv_dims < 0 else conv_dims
        self.conv = nn.Conv2d(in_channels, mid, 3, padding=1)
        self.cls_logits = nn.Conv2d(mid, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(mid, num_anchors * 4, 1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = [], []
        for x in features:
            t = F.relu(self.conv(x), inplace=True)  # in place: a conv's backward does not need its output
            # fp32 under autocast: logits rank the anchors (bf16 would tie them), deltas become pixels
            logits.append(fp32(self.cls_logits, t))
            deltas.append(fp32(self.bbox_pred, t))
        return logits, deltas

    def at_cells(self, features: list[Tensor], cells: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The head at chosen cells only: per level i, `cells[i]` [Ki, 3] (image, y, x) -> objectness [K, A] and
        deltas [K, A, 4] for the K = sum Ki cells in level order. The same values as forward() at those cells (to
        float rounding): the 3x3 conv at a cell is its 3x3 neighbourhood (zeros outside the map) convolved without
        padding. Gradients reach the features only in those neighbourhoods."""
        patches = [_neighbourhoods(x, c) for x, c in zip(features, cells)]
        x = torch.cat(patches) if patches else features[0].new_zeros(0, features[0].shape[1], 3, 3)
        t = F.relu(F.conv2d(x, self.conv.weight, self.conv.bias))  # [K, mid, 1, 1]
        logits = fp32(self.cls_logits, t).flatten(1)
        deltas = fp32(self.bbox_pred, t).view(len(t), -1, 4)  # channel 4a + j: anchor a, coordinate j
        return logits, deltas


_OFFSETS = (-1, 0, 1)


def _neighbourhoods(x: Tensor, cells: Tensor) -> Tensor:
    """x [N, C, H, W], cells [K, 3] (image, y, x) -> [K, C, 3, 3]: each cell's 3x3 neighbourhood, zero where it
    leaves the map (the head conv's padding)."""
    h, w = x.shape[-2:]
    d = torch.tensor(_OFFSETS, device=x.device)
    ys = (cells[:, 1, None] + d.repeat_interleave(3))  # [K, 9]: row-major over (dy, dx), the weight's (ky, kx)
    xs = (cells[:, 2, None] + d.repeat(3))
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    v = x[cells[:, :1], :, ys.clamp(0, h - 1), xs.clamp(0, w - 1)]  # [K, 9, C]
    v = v * inside.unsqueeze(-1).to(v.dtype)
    return v.transpose(1, 2).reshape(len(cells), x.shape[1], 3, 3)


class RPN(nn.Module):
    def __init__(
        self,
        *,
        in_features: Sequence[str],
        in_channels: int,
        anchor_generator: AnchorGenerator,
        box_coder: BoxCoder,
        matcher: Matcher,
        sampler: BalancedSampler,
        pre_nms_topk: tuple[int, int],  # (train, test), per level and image
        post_nms_topk: tuple[int, int],  # (train, test), per image
        nms_thresh: float = 0.7,
        min_size: float = 0.0,
        smooth_l1_beta: float = 0.0,
        conv_dims: int = -1,
        score_thresh: float = 0.0,  # on sigmoid(objectness); 0 keeps every proposal
        sigmoid_scores: bool = False,  # rank (NMS) and return proposals by probability, not logit
        loss_at_sampled_cells: bool = True,  # training: the head's gradient from the sampled anchors' cells only
    ):
        super().__init__()
        self.in_features = list(in_features)
        self.anchor_generator = anchor_generator
        self.head = RPNHead(in_channels=in_channels, num_anchors=anchor_generator.num_anchors, conv_dims=conv_dims)
        self.box_coder = box_coder
        self.matcher = matcher
        self.sampler = sampler
        self.pre_nms_topk = pre_nms_topk
        self.post_nms_topk = post_nms_topk
        self.nms_thresh = nms_thresh
        self.min_size = min_size
        self.smooth_l1_beta = smooth_l1_beta
        self.score_thresh = score_thresh
        self.sigmoid_scores = sigmoid_scores
        self.loss_at_sampled_cells = loss_at_sampled_cells

    def forward(self, images: ImageList, features: dict[str, Tensor], targets: Optional[list[dict]] = None,
                record: Optional[dict] = None, stats: Optional[dict] = None
                ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """Proposals per image (detached) and, in training, {"loss_rpn_cls", "loss_rpn_box"}. `record` (the
        model's probe) receives "anchors", "objectness", "rpn_deltas", "pre_nms", "proposals" and, with targets,
        "anchor_labels", "sampled_anchor_labels" and "anchor_matched_boxes". `stats` (training) receives
        rpn_pos_anchors and rpn_neg_anchors: the sampled positive and negative anchors per image."""
        feats = [features[name] for name in self.in_features]
        # The losses see only the sampled anchors, so with loss_at_sampled_cells the whole-map pass (for the
        # proposals, which are detached anyway) runs without autograd, and the losses compute the head again at
        # the sampled anchors' cells: the same losses and gradients, without the head's backward over every cell
        # of every level or its saved activations (README, "Where the time goes").
        at_cells = (self.training and self.loss_at_sampled_cells and torch.is_grad_enabled()
                    and hasattr(self.head, "at_cells"))  # a head of the user's own without it: the whole map
        with torch.no_grad() if at_cells else contextlib.nullcontext():
            logits, deltas = self.head(feats)
        anchors = self.anchor_generator([tuple(f.shape[-2:]) for f in feats], tuple(images.tensor.shape[-2:]))
        n = feats[0].shape[0]
        # [N, A, Hi, Wi] -> [N, Hi, Wi, A] -> [N, Hi*Wi*A]: the anchor order of AnchorGenerator
        logits = [x.permute(0, 2, 3, 1).reshape(n, -1) for x in logits]
        # [N, 4A, Hi, Wi] -> [N, A, 4, Hi, Wi] -> [N, Hi, Wi, A, 4] -> [N, Hi*Wi*A, 4]
        deltas = [x.view(n, -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
                  for x in deltas]
        proposals = self.select_proposals(anchors, [x.detach() for x in logits], [x.detach() for x in deltas],
                                          images.image_sizes, record)
        if record is not None:
            record.update(anchors=anchors, objectness=[x.detach() for x in logits],
                          rpn_deltas=[x.detach() for x in deltas], proposals=proposals)
        losses: dict[str, Tensor] = {}
        if self.training and targets is None:
            raise ValueError("RPN in training mode needs targets")
        if targets is not None and (self.training or record is not None):
            all_anchors = torch.cat(anchors)
            labels, sampled, matched_boxes = self.label_and_sample(all_anchors, targets)
            if record is not None:
                record.update(anchor_labels=labels, sampled_anchor_labels=sampled, anchor_matched_boxes=matched_boxes)
            if self.training and stats is not None:
                stats["rpn_pos_anchors"] = ratio((sampled == 1).sum(), len(sampled))
                stats["rpn_neg_anchors"] = ratio((sampled == 0).sum(), len(sampled))
            if at_cells:
                cell_logits, cell_deltas = self.sampled_head_outputs(feats, sampled)
                losses = self.losses_of_sampled(all_anchors, cell_logits, cell_deltas, sampled, matched_boxes)
            elif self.training:
                losses = self.losses(all_anchors, torch.cat(logits, 1), torch.cat(deltas, 1), sampled, matched_boxes)
        return proposals, losses

    # ------------------------------------------------------------------------------------- proposals
    @torch.no_grad()
    def select_proposals(self, anchors: list[Tensor], logits: list[Tensor], deltas: list[Tensor],
                         image_sizes: list[tuple[int, int]], record: Optional[dict] = None) -> list[dict[str, Tensor]]:
        """Per level: top-k over the whole batch, decode; per image: clip, drop small, NMS per level, top-k.
        `record` receives "pre_nms": per image dict(boxes [k, 4] decoded and clipped, scores [k], levels [k],
        anchor_index [k] into the concatenated anchors): the per-level top-k before the filters and NMS."""
        pre_k = self.pre_nms_topk[0 if self.training else 1]
        post_k = self.post_nms_topk[0 if self.training else 1]
        n = logits[0].shape[0]
        batch_idx = torch.arange(n, device=logits[0].device)[:, None]
        all_boxes, all_scores, all_levels, all_idx, offset = [], [], [], [], 0
        for level, (anc, lg, dl) in enumerate(zip(anchors, logits, deltas)):
            k = min(pre_k, lg.shape[1])
            scores, idx = lg.topk(k, dim=1)  # [N, k]
            if record is not None:
                all_idx.append(idx + offset)
                offset += len(anc)
            boxes = self.box_coder.decode(dl[batch_idx, idx].reshape(-1, 4), anc[idx].reshape(-1, 4))
            all_boxes.append(boxes.view(n, k, 4))
            all_scores.append(scores.float().sigmoid() if self.sigmoid_scores else scores.float())
            all_levels.append(torch.full((n, k), level, dtype=torch.int64, device=lg.device))
        boxes, scores, levels = torch.cat(all_boxes, 1), torch.cat(all_scores, 1), torch.cat(all_levels, 1)
        results, pre_nms = [], []
        for i, size in enumerate(image_sizes):  # the per-image loop only around NMS
            b, s, lv = clip_boxes(boxes[i], size), scores[i], levels[i]
            if record is not None:
                pre_nms.append({"boxes": b, "scores": s, "levels": lv, "anchor_index": torch.cat(all_idx, 1)[i]})
            keep = nonempty(b, self.min_size) & torch.isfinite(b).all(dim=1) & torch.isfinite(s)
            if self.score_thresh > 0:
                prob = s if self.sigmoid_scores else s.sigmoid()
                keep &= prob >= self.score_thresh
            b, s, lv = b[keep], s[keep], lv[keep]
            keep = batched_nms(b, s, lv, self.nms_thresh)[:post_k]  # sorted by score
            results.append({"boxes": b[keep], "scores": s[keep], "levels": lv[keep]})
        if record is not None:
            record["pre_nms"] = pre_nms
        return results

    # ----------------------------------------------------------------------------------------- losses
    @torch.no_grad()
    def label_anchors(self, anchors: Tensor, gt_boxes: Tensor) -> tuple[Tensor, Tensor]:
        """anchors [Ai, 4], gt [M, 4] -> labels [Ai] (1 pos, 0 neg, -1 ignore), matched gt boxes [Ai, 4]."""
        matches = self.matcher(box_iou(gt_boxes, anchors))
        labels = torch.full_like(matches, -1)
        labels[matches >= 0] = 1
        labels[matches == BELOW_LOW_THRESHOLD] = 0
        if gt_boxes.numel() == 0:
            return labels, torch.zeros_like(anchors)
        return labels, gt_boxes[matches.clamp(min=0)]

    @torch.no_grad()
    def label_and_sample(self, anchors: Tensor, targets: list[dict]) -> tuple[Tensor, Tensor, Tensor]:
        """anchors [Atot, 4] -> labels [N, Atot] (1 pos, 0 neg, -1 ignore), the same after sampling
        (-1: not sampled), matched gt boxes [N, Atot, 4]."""
        labels, sampled, matched_boxes = [], [], []
        for target in targets:
            lab, matched = self.label_anchors(anchors, target["boxes"])
            pos, neg = self.sampler(lab)
            s = torch.full_like(lab, -1)
            s[pos], s[neg] = 1, 0
            labels.append(lab)
            sampled.append(s)
            matched_boxes.append(matched)
        return torch.stack(labels), torch.stack(sampled), torch.stack(matched_boxes)

    def losses(self, anchors: Tensor, logits: Tensor, deltas: Tensor, sampled: Tensor, matched_boxes: Tensor
               ) -> dict[str, Tensor]:
        """anchors [Atot, 4], logits [N, Atot], deltas [N, Atot, 4], sampled labels [N, Atot], matched gt
        boxes [N, Atot, 4]."""
        valid = sampled >= 0
        return self.losses_of_sampled(anchors, logits[valid], deltas[valid], sampled, matched_boxes)

    def losses_of_sampled(self, anchors: Tensor, logits: Tensor, deltas: Tensor, sampled: Tensor,
                          matched_boxes: Tensor) -> dict[str, Tensor]:
        """losses() from the sampled anchors' outputs only: logits [S], deltas [S, 4] in the order of
        (sampled >= 0).nonzero() (image by image, anchor by anchor)."""
        valid = sampled >= 0
        pos = sampled == 1
        normalizer = max(1, int(valid.sum()))
        loss_cls = F.binary_cross_entropy_with_logits(
            logits.float(), sampled[valid].float(), reduction="sum") / normalizer
        # Regression targets only for the sampled positives: [N, Atot, 4][pos] -> [P, 4]
        reg = self.box_coder.encode(anchors.expand(len(sampled), -1, -1)[pos], matched_boxes[pos])
        loss_box = smooth_l1_sum(deltas[sampled[valid] == 1], reg, self.smooth_l1_beta) / normalizer
        return {"loss_rpn_cls": loss_cls, "loss_rpn_box": loss_box}

    def sampled_head_outputs(self, feats: list[Tensor], sampled: Tensor) -> tuple[Tensor, Tensor]:
        """The head's objectness [S] and deltas [S, 4] at the S sampled anchors (sampled [N, Atot] >= 0), in
        the order of (sampled >= 0).nonzero(), computed at their cells only (RPNHead.at_cells): an anchor's
        index within level i is (y * Wi + x) * A + a (AnchorGenerator's order)."""
        image, index = (sampled >= 0).nonzero(as_tuple=True)
        a = self.anchor_generator.num_anchors
        cells_per_level = torch.tensor([f.shape[-2] * f.shape[-1] for f in feats], device=index.device)
        ends = cells_per_level.cumsum(0) * a
        level = torch.bucketize(index, ends, right=True)  # anchors [ends[i-1], ends[i]) are level i's
        local = index - (ends - cells_per_level * a)[level]
        cell, anchor = local // a, local % a
        # one row per distinct (level, image, cell), sorted: level by level
        rows, inverse = torch.unique(torch.stack([level, image, cell], 1), dim=0, return_inverse=True)
        cells = []
        for i, f in enumerate(feats):
            _, img, c = rows[rows[:, 0] == i].unbind(1)
            cells.append(torch.stack([img, c // f.shape[-1], c % f.shape[-1]], 1))
        logits, deltas = self.head.at_cells(feats, cells)
        return logits[inverse, anchor], deltas[inverse, anchor]
