"""Lesson 10 (06_cuda_cnn_hooks_init), timed: a convolution is lesson 01's matmul of unfolded inputs.

``F.unfold`` copies every k x k receptive field of the input into a column ([N, C_in*k*k, H_out*W_out]); the
convolution is then one matmul of the [C_out, C_in*k*k] weight with those columns, plus the bias. That is how
the lesson's convolutions can be seen as matmuls, and how early GPU libraries ran them (im2col). PyTorch's
``F.conv2d`` picks its own algorithm. Both run at each convolution of lesson 06's CNN at bs 512 on 28x28
MNIST: Conv(1,8,5,s2,p2), Conv(8,16,3,s2,p1), Conv(16,32,3,s2,p1), Conv(32,32,3,s2,p1), forward.

The work is 2 * N * C_out * C_in * k * k * H_out * W_out flops; the report gives GFLOP/s and the fraction of
the matmul peak the harness measured at the start of the run (``limit_peak_gflops``). Inputs and weights are
uniform in [0, 1) (as bench_matmul's: no cancellation, so every output can be held to the lesson's relative
tolerance); each kernel is checked against float64 ``F.conv2d`` before it is timed.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from benchmarks import harness

# (name, C_in, C_out, kernel size): lesson 06's CNN, each stride 2 with padding k // 2, on 28x28 images.
LAYERS = (("conv1", 1, 8, 5), ("conv2", 8, 16, 3), ("conv3", 16, 32, 3), ("conv4", 32, 32, 3))
STRIDE = 2
# (batch size, layers) per set.
CASES = {
    "tiny": (4, ("conv1", "conv4")),
    "quick": (512, ("conv1", "conv3")),
    "full": (512, ("conv1", "conv2", "conv3", "conv4")),
}


def unfold_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int, padding: int):
    """A convolution as a matmul: every receptive field a column (F.unfold), then ``weight @ columns``."""
    n, _, h, w = x.shape
    c_out, _, k, _ = weight.shape
    columns = F.unfold(x, k, padding=padding, stride=stride)  # [N, C_in * k * k, H_out * W_out]
    out = weight.reshape(c_out, -1) @ columns + bias[:, None]  # [N, C_out, H_out * W_out]
    return out.view(n, c_out, (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1)


KERNELS = {"F.unfold + matmul": unfold_conv2d, "F.conv2d": F.conv2d}


def _input_sizes() -> dict[str, int]:
    """Each layer's input height (= width): 28, then halved (rounding up) by each stride-2 layer."""
    sizes, h = {}, 28
    for name, *_, k in LAYERS:
        sizes[name] = h
        h = (h + 2 * (k // 2) - k) // STRIDE + 1
    return sizes


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "conv_layer" not in metafunc.fixturenames:
        return
    bs, names = CASES[harness.bench_set(metafunc.config)]
    layers = [layer for layer in LAYERS if layer[0] in names]
    metafunc.parametrize(
        "conv_layer", [pytest.param((bs, *layer), id=f"{layer[0]}-bs{bs}") for layer in layers]
    )
    metafunc.parametrize("kernel", list(KERNELS))


def test_conv2d(benchmark: Any, limits_for, sizes, conv_layer, kernel: str) -> None:
    """One convolution of lesson 06's CNN, forward, as a matmul of unfolded inputs or by F.conv2d, checked
    against float64 F.conv2d, timed, and set against the measured matmul peak."""
    n, name, c_in, c_out, k = conv_layer
    h = _input_sizes()[name]
    padding = k // 2
    benchmark.group = f"conv2d {name} bs{n} cpu float32"
    limits = limits_for("cpu")
    gen = torch.Generator().manual_seed(c_in * 100 + c_out)
    x = torch.rand(n, c_in, h, h, generator=gen)
    weight = torch.rand(c_out, c_in, k, k, generator=gen) / (c_in * k * k)  # outputs of order one
    bias = torch.rand(c_out, generator=gen)
    want = F.conv2d(x.double(), weight.double(), bias.double(), stride=STRIDE, padding=padding)
    conv = KERNELS[kernel]

    def run():
        return conv(x, weight, bias, stride=STRIDE, padding=padding)

    run()  # warm-up: first-touch pages, the BLAS threads
    got, first_s, peak, how = harness.call_with_peak_memory(run, "cpu")
    rtol, atol = harness.TOLERANCES["float32"]
    max_diff = harness.check_close(f"{kernel} {name} bs{n}", got, want, rtol, atol)
    out_shape = tuple(got.shape)
    del got, want
    harness.time_kernel(benchmark, run, first_s, sizes, "cpu")
    _, _, h_out, w_out = out_shape
    harness.record(
        benchmark,
        limits,
        dtype="float32",
        flops=2 * n * c_out * c_in * k * k * h_out * w_out,
        # The floor's traffic: the input and the weight read once, the output written once.
        bytes_moved=(x.numel() + weight.numel() + bias.numel() + n * c_out * h_out * w_out) * 4,
        first_call_s=first_s,
        peak_mem=peak,
        peak_mem_method=how,
        op="conv2d",
        case="fwd",
        kernel=kernel,
        layer=f"{name}: Conv({c_in},{c_out},{k},s{STRIDE},p{padding})",
        layer_index=[layer[0] for layer in LAYERS].index(name),
        n=n,
        input_shape=str(tuple(x.shape)),
        output_shape=str(out_shape),
        shape=f"{tuple(x.shape)} -> {out_shape}",
        checked_against="float64 F.conv2d",
        rtol=rtol,
        atol=atol,
        max_abs_diff=max_diff,
    )
