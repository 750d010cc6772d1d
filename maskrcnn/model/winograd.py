"""Winograd's minimal filtering F(2x2, 3x3) for 3x3 convolutions on a CPU: fewer multiplications for the same
convolution (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).

A 3x3 convolution (stride 1, padding 1) computes each 2x2 block of its output from a 4x4 tile of its input: 36
multiply-adds per channel pair done directly, 16 in Winograd's form. The tile d and the filter g are transformed
into that form (V = B^T d B, U = G g G^T, both 4x4), multiplied element by element (16 matrix products over the
channels, for all tiles at once: [tiles, C] x [C, K]), and the product transformed back (Y = A^T M A):

    B^T = [[1, 0, -1, 0],      G = [[1,    0,   0 ],      A^T = [[1, 1,  1,  0],
           [0, 1,  1, 0],           [1/2,  1/2, 1/2],             [0, 1, -1, -1]]
           [0, -1, 1, 0],           [1/2, -1/2, 1/2],
           [0, 1,  0, -1]]          [0,    0,   1 ]]

The multiplications drop 2.25x; what is added are the transforms, cheap sums that read and write memory. They
run over chunks of ~1000 tiles so that a chunk's transformed tiles stay in the CPU's cache. The backward pass goes
through the same transforms: the input's gradient is the convolution of the output's gradient with the filters
turned by 180 degrees (U permuted), the weight's is V^T (A gY A^T) summed over the tiles, brought back by G^T . G.
The results equal F.conv2d's to float rounding (relative ~1.5e-6 on 256 channels; tests/test_winograd.py).

`winograd_convs` turns chosen Conv2d modules into WinogradConv2d (the same parameters and state dict), which
computes in fp32 on a CPU and is the plain Conv2d elsewhere (autocast, other dtypes, CUDA), and, with autograd, for
maps of fewer than MIN_TILES_WITH_AUTOGRAD tiles, where the plain convolution was measured faster. Which
convolutions, and where, is `model/fuse.py`'s (test.winograd, train.winograd; the figures are in the README).
Shapes: N images, C input and K output channels, H x W.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# G: the filter's transform (4x3); U = G g G^T for every (output, input) channel pair.
_G = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]]

# With autograd every call transforms its filters and the weight's gradient costs 16 products of C x K whatever the
# tiles: below ~1000 tiles (images x 2x2 output blocks) the plain convolution was as fast or faster (AVX2: 4 x 128
# x 22x22 0.96x, 4 x 256 x 11x11 1.2x, 4 x 512 x 6x6 2.7x the plain one's time; 20 RoIs x 256 x 14x14 0.68x).
MIN_TILES_WITH_AUTOGRAD = 1024
TILES_PER_CHUNK = 1024  # ~16 MB of transformed fp32 tiles at 256 channels: measured best at 256-1024 on AVX2
# A band of one image's tile rows (a map too big for one chunk) takes half as many: forward and backward of
# 2 x 256 x 128x128 0.84-0.94x the time of 1024-tile bands, 2 x 256 x 64x64 0.81-0.89x (AVX2, three runs),
# and half the transformed tiles alive at the peak of the FPN's P2 backward (16 MB less). Chunks of whole images
# (RoIs: 256 x 256 x 14x14) keep 1024, where 512 was 1.06x slower.


def _kron_g(like: Tensor) -> Tensor:
    """G (x) G [16, 9]: U = G g G^T of one 3x3 filter as one product with the flattened filter (row 4i + m, column
    3j + l holds G[i, j] G[m, l])."""
    g = torch.tensor(_G, dtype=like.dtype, device=like.device)
    return torch.kron(g, g)


def filter_transform(weight: Tensor) -> Tensor:
    """[K, C, 3, 3] -> U [16, C, K]: G g G^T of every filter, position-major, ready for the 16 matrix products.
    One matrix product, computed as [16, K, C] (no transposing copy) and returned as its transposed view."""
    k, c = weight.shape[:2]
    return (_kron_g(weight) @ weight.reshape(k * c, 9).T).view(16, k, c).transpose(1, 2)


# Turning a filter by 180 degrees reverses G's columns, which swaps G's rows 0 and 3: U of the turned filter is U
# with positions i, m -> (3, 1, 2, 0)[i], (3, 1, 2, 0)[m].
_TURNED = [4 * i + m for i in (3, 1, 2, 0) for m in (3, 1, 2, 0)]


def turned_transform(u: Tensor) -> Tensor:
    """U [16, C, K] of filters g -> U [16, K, C] of the filters the input's gradient is convolved with: each filter
    turned by 180 degrees, input and output channels swapped."""
    return u[_TURNED].transpose(1, 2)


def _rows(d: list[Tensor]) -> list[Tensor]:
    """B^T applied along one axis of the 4 input rows (or columns) of every tile."""
    return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _input_tiles(xp: Tensor) -> Tensor:
    """Input transform V = B^T d B of every tile of a chunk: xp [n, 2r + 2, 2w + 2, C] padded input (channels
    last) -> [16, n * r * w, C]. Rows, then columns; tile (i, j) has row a at xp[:, 2i + a]."""
    n, hp, wp, c = xp.shape
    r, w = (hp - 2) // 2, (wp - 2) // 2
    t = _rows([xp[:, a:a + 2 * r:2] for a in range(4)])  # 4 x [n, r, wp, C]
    v = xp.new_empty(4, 4, n, r, w, c)
    for a in range(4):
        cols = [t[a][:, :, b:b + 2 * w:2] for b in range(4)]
        torch.sub(cols[0], cols[2], out=v[a, 0])
        torch.add(cols[1], cols[2], out=v[a, 1])
        torch.sub(cols[2], cols[1], out=v[a, 2])
        torch.sub(cols[1], cols[3], out=v[a, 3])
    return v.view(16, n * r * w, c)


def _output_blocks(m: Tensor, out: Tensor) -> None:
    """Output transform Y = A^T M A: m [16, n * r * w, K] -> out [n, r, 2, w, 2, K] (the 2x2 output blocks)."""
    m = m.view(4, 4, *out.shape[:2], out.shape[3], -1)
    s = (m[0] + m[1] + m[2], m[1] - m[2] - m[3])  # rows; each [4 (columns), n, r, w, K]
    for a in range(2):
        torch.add(s[a][0] + s[a][1], s[a][2], out=out[:, :, a, :, 0])
        torch.sub(s[a][1] - s[a][2], s[a][3], out=out[:, :, a, :, 1])


def _block_grads(gp: Tensor) -> Tensor:
    """The output transform's adjoint, A gY A^T: the gradient of the output blocks gp [n, 2r, 2w, K] (channels
    last) -> the gradient of M [16, n * r * w, K]. A = [[1, 0], [1, 1], [1, -1], [0, -1]]."""
    n, h2, w2, k = gp.shape

    def adjoint(g0: Tensor, g1: Tensor) -> list[Tensor]:
        return [g0, g0 + g1, g0 - g1, -g1]

    q = adjoint(gp[:, 0::2], gp[:, 1::2])  # rows: 4 x [n, r, 2w, K]
    gm = gp.new_empty(4, 4, n, h2 // 2, w2 // 2, k)
    for i in range(4):
        for j, g in enumerate(adjoint(q[i][:, :, 0::2], q[i][:, :, 1::2])):
            gm[i, j] = g
    return gm.view(16, -1, k)


def _chunks(n: int, th: int, tw: int, tiles_per_chunk: int):
    """(first image, last image + 1, first tile row, last tile row + 1) of each chunk: whole images when an image
    has few tiles, else bands of tile rows of one image (half a chunk's tiles, see TILES_PER_CHUNK)."""
    images = max(1, tiles_per_chunk // (th * tw))
    rows = th if images > 1 else max(1, min(th, tiles_per_chunk // 2 // tw))
    for i in range(0, n, images):
        for r in range(0, th, rows):
            yield i, min(n, i + images), r, min(th, r + rows)


def _window(t: Tensor, i0: int, i1: int, top: int, rows: int, left: int, cols: int) -> Tensor:
    """Images i0:i1 of t [N, C, H, W], rows top:top + rows and columns left:left + cols, with zeros where these
    fall outside the map -> [i1 - i0, rows, cols, C] (a channels-last view). One chunk's window at a time, so that a
    convolution never holds a padded copy of the whole map (35 MB for 2 x 256 x 128x128, and the backward pass
    padded both its input and its output's gradient). A view of t where nothing is padded, else a copy in t's
    memory format (a channels-last copy of a standard-layout map was measured 1.12x slower)."""
    h, w = t.shape[2:]
    a, b, l, r = max(top, 0), min(top + rows, h), max(left, 0), min(left + cols, w)
    src = t[i0:i1, :, a:b, l:r]
    if (a, b, l, r) != (top, top + rows, left, left + cols):
        layout = torch.channels_last if t.stride(1) == 1 else torch.contiguous_format
        out = torch.empty((i1 - i0, t.shape[1], rows, cols), dtype=t.dtype, device=t.device, memory_format=layout)
        out[:, :, :a - top].zero_()
        out[:, :, b - top:].zero_()
        out[:, :, :, :l - left].zero_()
        out[:, :, :, r - left:].zero_()
        out[:, :, a - top:b - top, l - left:r - left].copy_(src)
        src = out
    return src.permute(0, 2, 3, 1)


def conv3x3(x: Tensor, u: Tensor, bias: Tensor | None, tiles_per_chunk: int | None = None) -> Tensor:
    """F.conv2d(x, weight, bias, padding=1) for a 3x3 weight given as u = filter_transform(weight).
    x [N, C, H, W] in any memory format -> [N, K, H, W], always channels-last in memory (the layout the blocks are
    written in; in a model trained in the standard layout the layers after it then run channels-last too, as
    the measured gains include)."""
    tiles_per_chunk = tiles_per_chunk or TILES_PER_CHUNK
    n, _, h, w = x.shape
    k = u.shape[2]
    th, tw = (h + 1) // 2, (w + 1) // 2  # 2x2 output blocks; odd sizes compute one extra row/column, dropped
    out = torch.empty((n, k, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    even = h == 2 * th and w == 2 * tw
    blocks = out.permute(0, 2, 3, 1) if even else x.new_empty(n, 2 * th, 2 * tw, k)  # written block by block
    y = blocks.view(n, th, 2, tw, 2, k)
    for i0, i1, r0, r1 in _chunks(n, th, tw, tiles_per_chunk):
        xp = _window(x, i0, i1, 2 * r0 - 1, 2 * (r1 - r0) + 2, -1, 2 * tw + 2)  # the chunk's tiles, padded by 1
        _output_blocks(torch.bmm(_input_tiles(xp), u), y[i0:i1, r0:r1])
    if not even:
        out.permute(0, 2, 3, 1).copy_(blocks[:, :h, :w])
    if bias is not None:
        out += bias[:, None, None]
    return out


def weight_grad(x: Tensor, grad_y: Tensor, tiles_per_chunk: int | None = None) -> Tensor:
    """The gradient of a 3x3 convolution's weight [K, C, 3, 3] from its input x [N, C, H, W] and the gradient of
    its output grad_y [N, K, H, W], through the same transforms: dU = sum over tiles V^T (A gY A^T), dg = G^T dU G."""
    tiles_per_chunk = tiles_per_chunk or TILES_PER_CHUNK
    n, c, h, w = x.shape
    k = grad_y.shape[1]
    th, tw = (h + 1) // 2, (w + 1) // 2
    du = x.new_zeros(16, k, c)  # dU^T: [K, C] per position, so that the last product needs no transposing copy
    for i0, i1, r0, r1 in _chunks(n, th, tw, tiles_per_chunk):
        v = _input_tiles(_window(x, i0, i1, 2 * r0 - 1, 2 * (r1 - r0) + 2, -1, 2 * tw + 2))
        gp = _window(grad_y, i0, i1, 2 * r0, 2 * (r1 - r0), 0, 2 * tw)  # whole 2x2 blocks: odd sizes padded
        du.baddbmm_(_block_grads(gp).transpose(1, 2), v)
    # dg = G^T dU G for every filter: the transpose of filter_transform's product
    return (du.view(16, k * c).T @ _kron_g(x)).view(k, c, 3, 3)


class _Conv3x3(torch.autograd.Function):
    """conv3x3 with its backward through Winograd's transforms too: the input's gradient is the convolution of the
    output's gradient with every filter turned by 180 degrees and its channels swapped (conv3x3 again), the
    weight's is weight_grad. Only the input and the weight are kept for the backward, as F.conv2d keeps."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return conv3x3(x, filter_transform(weight), bias)

    @staticmethod
    @once_differentiable  # no double backward (its out= writes are not differentiable): a clear error instead
    def backward(ctx, grad_y: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = conv3x3(grad_y, turned_transform(filter_transform(weight)), None)
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(x, grad_y)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


class WinogradConv2d(nn.Conv2d):
    """A 3x3 Conv2d (stride 1, padding 1, no dilation or groups) computed by Winograd's F(2x2, 3x3) in fp32 on a
    CPU: with autograd (forward and backward through the transforms, _Conv3x3) or without (the filter transform
    cached, recomputed when the weight is replaced, moved, loaded or changed in place by autograd-visible ops;
    an edit through `.data` is not seen: call train() or eval() after one). Anything else (other dtypes, autocast,
    CUDA, an unbatched input, a geometry F(2x2, 3x3) does not compute) is the plain Conv2d."""

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                or torch.is_autocast_enabled("cpu") or x.dim() != 4 or not _geometry(self)):
            return super().forward(x)
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            if x.shape[0] * ((x.shape[2] + 1) // 2) * ((x.shape[3] + 1) // 2) < MIN_TILES_WITH_AUTOGRAD:
                return super().forward(x)
            return _Conv3x3.apply(x, self.weight, self.bias)
        if self.weight.is_inference():  # no version counter to key a cache on: transform at every call
            return conv3x3(x, filter_transform(self.weight), self.bias)
        key = (id(self.weight), self.weight.data_ptr(), self.weight._version)
        if getattr(self, "_winograd_key", None) != key:
            self._winograd_u = filter_transform(self.weight.detach())
            self._winograd_key = key
        return conv3x3(x, self._winograd_u, self.bias)

    def train(self, mode: bool = True) -> "WinogradConv2d":
        """Also drops the cached filter transform (1.8x the weight's memory), which training would make stale."""
        self.__dict__.pop("_winograd_u", None)
        self.__dict__.pop("_winograd_key", None)
        return super().train(mode)


def _geometry(conv: nn.Conv2d) -> bool:
    """3x3, stride 1, padding 1 of zeros, no dilation, one group: what F(2x2, 3x3) computes."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def eligible(conv: nn.Module, min_channels: int = 1) -> bool:
    """A plain nn.Conv2d (not a subclass: model/fuse.py's FrozenBNConv2d computes its own weight) of Winograd's
    geometry with at least `min_channels` input and output channels."""
    return (type(conv) is nn.Conv2d and _geometry(conv)
            and min(conv.in_channels, conv.out_channels) >= min_channels)


def winograd_convs(modules: Iterable[nn.Module], min_channels: int = 1) -> int:
    """In place: every eligible Conv2d inside `modules` becomes a WinogradConv2d (the same object, parameters and
    state dict keys; only its forward changes). Returns how many."""
    n = 0
    for module in modules:
        for m in module.modules():
            if eligible(m, min_channels):
                m.__class__ = WinogradConv2d
                n += 1
    return n
