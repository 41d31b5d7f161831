"""Lesson 10 (07_batchnorm): normalising activations inside the model, and its variants.

The notebook writes ``BatchNorm`` (each channel's mean and variance over the batch and the pixels,
learnt ``mults`` and ``adds``, running averages for evaluation); with it after every GeneralRelu the
CNN trains at a learning rate of 1. Then the variants that normalise over other axes: ``LayerNorm``
(each image over all its channels and pixels: two scalars) and ``InstanceNorm`` (each image and
channel over its pixels), neither of which can classify these digits, and which the lesson asks to
explain. Last, small batches: at batch size 2 a batch norm's statistics are noise and its running
averages are useless for evaluation; ``RunningBatchNorm`` normalises with the running statistics in
training too, debiased, with a momentum that depends on the batch size.

Kept as the notebook has them, and shown in the spec: ``BatchNorm``, ``LayerNorm`` and ``InstanceNorm``
use the unbiased variance (PyTorch normalises with the biased one), ``BatchNorm`` computes its statistics
under ``no_grad`` (its gradient treats them as constants), and ``InstanceNorm``'s eps is 1.0.

Where minilib departs from the notebook:
- ``RunningBatchNorm`` is the notebook's debiased version, not the older one that ``nb_07.py`` exported.
  Its buffers are stored detached (the notebook kept the last batch's graph in them and cut it with
  ``detach_()`` at the next step: the same gradient, without holding a graph in the module's state).
  A batch of one sample in training is a ValueError (the notebook: ``ZeroDivisionError`` in
  ``sqrt(bs - 1)``), and in eval mode before any training step it gives ``x * mults + adds`` (the
  notebook: 0 / 0, NaN everywhere).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minilib import contract
from minilib.cnn import conv_layer

__all__ = ["BatchNorm", "LayerNorm", "InstanceNorm", "RunningBatchNorm", "conv_ln", "conv_in", "conv_rbn"]


def _norm_args(fname: str, nf: int | None, mom: float | None, eps: float) -> None:
    if nf is not None:
        contract.positive_int(fname, nf=nf)
    if mom is not None:
        contract.finite_number(fname, within=(0.0, 1.0), mom=mom)
    contract.finite_number(fname, positive=True, eps=eps)


def _images(fname: str, x: torch.Tensor, nf: int | None = None) -> None:
    """``x`` is a float batch of images ``[N, C, H, W]`` with ``nf`` channels."""
    contract.float_tensor(fname, x=x)
    contract.ndim(fname, "x", x, 4, "[N, C, H, W]")
    if nf is not None and x.shape[1] != nf:
        contract.fail(fname, "x", f"[N, {nf}, H, W] ({nf} channels, as built)", x)


class BatchNorm(nn.Module):
    """The notebook's batch norm: per channel, ``(x - mean) / sqrt(var + eps) * mults + adds``.

    In training the mean and the (unbiased) variance are taken over the batch and the pixels, dims
    (0, 2, 3), under ``no_grad``, and the running ``means``/``vars`` move ``mom`` of the way towards
    them (``lerp_``: ``new = old + mom * (batch - old)``, PyTorch's ``momentum`` 0.1). Eval mode uses
    the running ones.
    """

    def __init__(self, nf: int, mom: float = 0.1, eps: float = 1e-5):
        super().__init__()
        _norm_args("BatchNorm", nf, mom, eps)
        self.mom, self.eps = mom, eps
        self.mults = nn.Parameter(torch.ones(nf, 1, 1))
        self.adds = nn.Parameter(torch.zeros(nf, 1, 1))
        self.register_buffer("vars", torch.ones(1, nf, 1, 1))
        self.register_buffer("means", torch.zeros(1, nf, 1, 1))

    def update_stats(self, x):
        m = x.mean((0, 2, 3), keepdim=True)
        v = x.var((0, 2, 3), keepdim=True)
        self.means.lerp_(m, self.mom)
        self.vars.lerp_(v, self.mom)
        return m, v

    def forward(self, x):
        _images("BatchNorm", x, self.mults.shape[0])
        if self.training:
            with torch.no_grad():
                m, v = self.update_stats(x)
        else:
            m, v = self.means, self.vars
        x = (x - m) / (v + self.eps).sqrt()
        return x * self.mults + self.adds

    def extra_repr(self) -> str:
        return f"{self.mults.shape[0]}, mom={self.mom}, eps={self.eps}"


class LayerNorm(nn.Module):
    """Each image normalised over all its channels and pixels, dims (1, 2, 3), with ONE learnt ``mult``
    and ``add``. No statistics over the batch: it works at any batch size, and trains like eval."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        _norm_args("LayerNorm", None, None, eps)
        self.eps = eps
        self.mult = nn.Parameter(torch.tensor(1.0))
        self.add = nn.Parameter(torch.tensor(0.0))

    def forward(self, x):
        _images("LayerNorm", x)
        m = x.mean((1, 2, 3), keepdim=True)
        v = x.var((1, 2, 3), keepdim=True)
        x = (x - m) / (v + self.eps).sqrt()
        return x * self.mult + self.add


class InstanceNorm(nn.Module):
    """Each image AND channel normalised over its pixels, dims (2, 3), with learnt ``mults``/``adds``.

    Its eps is 1.0, as the notebook's: on activations whose variance is below 1, that is no longer a
    guard against dividing by zero but most of the denominator.
    """

    def __init__(self, nf: int, eps: float = 1e-0):
        super().__init__()
        _norm_args("InstanceNorm", nf, None, eps)
        self.eps = eps
        self.mults = nn.Parameter(torch.ones(nf, 1, 1))
        self.adds = nn.Parameter(torch.zeros(nf, 1, 1))

    def forward(self, x):
        _images("InstanceNorm", x, self.mults.shape[0])
        m = x.mean((2, 3), keepdim=True)
        v = x.var((2, 3), keepdim=True)
        res = (x - m) / (v + self.eps).sqrt()
        return res * self.mults + self.adds


class RunningBatchNorm(nn.Module):
    """The notebook's batch norm for small batches: normalise with RUNNING statistics, in training too.

    It keeps exponentially weighted ``sums`` and ``sqrs`` of the activations and their ``count`` per
    channel; mean = sums / count and variance = sqrs / count - mean**2. The weight of a new batch,
    ``mom1 = 1 - (1 - mom) / sqrt(bs - 1)``, grows with the batch (0.100 at bs 2, 0.838 at bs 32): a
    big batch is a good estimate by itself. For the first 100 steps the three are divided by ``dbias``
    (the total weight given so far, as Adam debiases its averages), and for the first 20 samples the
    variance is at least 0.01.
    """

    def __init__(self, nf: int, mom: float = 0.1, eps: float = 1e-5):
        super().__init__()
        _norm_args("RunningBatchNorm", nf, mom, eps)
        self.mom, self.eps = mom, eps
        self.mults = nn.Parameter(torch.ones(nf, 1, 1))
        self.adds = nn.Parameter(torch.zeros(nf, 1, 1))
        for name in ("sums", "sqrs"):
            self.register_buffer(name, torch.zeros(1, nf, 1, 1))
        for name in ("batch", "count", "step", "dbias"):
            self.register_buffer(name, torch.tensor(0.0))

    def update_stats(self, x):
        """Move the running statistics towards this batch's; return them WITH this batch's gradient."""
        bs, nc = x.shape[:2]
        if bs < 2:
            contract.fail("RunningBatchNorm", "x", "a batch of at least two samples in training", x)
        s = x.sum((0, 2, 3), keepdim=True)
        ss = (x * x).sum((0, 2, 3), keepdim=True)
        c = self.count.new_tensor(x.numel() / nc)
        mom1 = 1 - (1 - self.mom) / math.sqrt(bs - 1)
        self.mom1 = self.dbias.new_tensor(mom1)
        sums, sqrs = self.sums.lerp(s, mom1), self.sqrs.lerp(ss, mom1)
        with torch.no_grad():
            self.sums.copy_(sums)
            self.sqrs.copy_(sqrs)
            self.count.lerp_(c, mom1)
            self.dbias.mul_(1 - mom1).add_(mom1)
            self.batch += bs
            self.step += 1
        return sums, sqrs

    def forward(self, x):
        _images("RunningBatchNorm", x, self.mults.shape[0])
        if self.training:
            sums, sqrs = self.update_stats(x)
        elif self.count == 0:
            return x * self.mults + self.adds  # nothing seen yet: no statistics to normalise with
        else:
            sums, sqrs = self.sums, self.sqrs
        c = self.count
        if self.step < 100:
            sums, sqrs, c = sums / self.dbias, sqrs / self.dbias, c / self.dbias
        means = sums / c
        vars = sqrs / c - means * means
        if bool(self.batch < 20):
            vars = vars.clamp_min(0.01)
        x = (x - means) / (vars + self.eps).sqrt()
        return x * self.mults + self.adds

    def extra_repr(self) -> str:
        return f"{self.mults.shape[0]}, mom={self.mom}, eps={self.eps}"


def conv_ln(ni: int, nf: int, ks: int = 3, stride: int = 2, bn: bool = True, **kwargs) -> nn.Sequential:
    """``conv_layer`` with ``LayerNorm()`` (the conv keeps its bias)."""
    return conv_layer(ni, nf, ks, stride, bn, norm=LayerNorm, **kwargs)


def conv_in(ni: int, nf: int, ks: int = 3, stride: int = 2, bn: bool = True, **kwargs) -> nn.Sequential:
    """``conv_layer`` with ``InstanceNorm(nf)`` (the conv keeps its bias)."""
    return conv_layer(ni, nf, ks, stride, bn, norm=InstanceNorm, **kwargs)


def conv_rbn(ni: int, nf: int, ks: int = 3, stride: int = 2, bn: bool = True, **kwargs) -> nn.Sequential:
    """``conv_layer`` with ``RunningBatchNorm(nf)`` (no conv bias: the norm subtracts each channel's mean)."""
    return conv_layer(ni, nf, ks, stride, bn, norm=RunningBatchNorm, **kwargs)
