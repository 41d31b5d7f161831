"""Beyond the lessons: lesson 07's BatchNorm (07_batchnorm) as a fused kernel, two sweeps where six were.

07_batchnorm writes BatchNorm as ``x.mean``, ``x.var``, then subtract, divide, multiply and add: six
sweeps over the activations, each reading the whole tensor from memory and most writing one back.
PyTorch's own CPU kernel is not much better: measured on a 2-core machine (torch 2.13, float32) at
(256, 64, 28, 28), ``y.copy_(x)`` took 3.7 ms, ``F.batch_norm``'s training forward 35 ms (9.5x the copy),
its forward and backward 65 ms (about 7x a copy plus an add), and the lesson's BatchNorm forward 81 ms.
Yet per channel only two numbers matter, the mean and the variance, and one channel's values (N x H x W
of them, under a MiB at the lesson's shapes) fit in cache. So ``minilib.kernels.fused_batch_norm``
computes a channel's statistics in one sweep from memory and writes its output in a second sweep while
the channel is still in cache: the input is read from memory once and the output written once, as a
copy does. The backward likewise: one sweep for the channel's two sums, sum(dy) and sum(dy * xhat), one
for the gradient.

Two things a fast kernel must not lose. The gradient flows through the batch statistics (the notebook's
first BatchNorm took them as constants, and its gradient is not nn.BatchNorm2d's). And the variance is
never E[x^2] - E[x]^2 in float32, which loses every digit when the mean is large next to the spread:
each block of a channel is centred on its own mean first, so inputs with a mean of 1e4 come out at
least as close to the float64 answer as PyTorch's own float32 kernel.

``fused_batch_norm`` has F.batch_norm's signature and meaning, and ``FusedBatchNorm2d`` is a drop-in
nn.BatchNorm2d. On the CPU (float32) it is a C++ kernel built on first use, with a torch-ops fallback for
other dtypes and machines without a compiler; on CUDA, Triton kernels, which these tests run in Triton's
interpreter (``TRITON_INTERPRET=1``) when there is no GPU. Everything is checked against ``F.batch_norm``
in float64; speed is measured outside the tests (the machine is shared; see the benchmarks).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from support import another_process_holding
from torch import nn

from minilib import _cpu_batch_norm as cpu_bn
from minilib import kernels
from minilib.kernels import FusedBatchNorm2d, fused_batch_norm
from minilib.testing import test_close, test_near

pytestmark = pytest.mark.kernels

try:
    from minilib import _triton_batch_norm as tbn
except ImportError:
    tbn = None

CUDA = torch.cuda.is_available()
INTERPRET = tbn is not None and tbn.INTERPRET


# --- The yardstick and the paths ----------------------------------------------------------------------


def channel_dims(x):
    return [0, *range(2, x.dim())]


def problem(shape, mean=1.0, std=2.0, dtype=torch.float32, affine=True):
    """Input, weight, bias, running buffers and an upstream gradient for one call, float32 by default."""
    C = shape[1]
    x = (torch.randn(shape) * std + mean).to(dtype)
    w = (torch.rand(C) + 0.5).to(dtype) if affine else None
    b = torch.randn(C).to(dtype) if affine else None
    rm, rv = torch.randn(C).to(dtype), (torch.rand(C) + 0.5).to(dtype)
    dy = torch.randn(shape).to(dtype)
    return x, w, b, rm, rv, dy


def run(fn, x, w, b, rm, rv, dy, training, **options):
    """(y, dx, dw, db, running_mean, running_var) of one call of ``fn`` (F.batch_norm's signature) and
    its backward, on copies: the caller's tensors are left alone."""
    x = x.detach().clone().requires_grad_()
    w = None if w is None else w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    rm = None if rm is None else rm.clone()
    rv = None if rv is None else rv.clone()
    y = fn(x, rm, rv, w, b, training=training, **options)
    y.backward(dy)
    grads = [None if t is None else t.grad for t in (x, w, b)]
    return (y.detach(), *grads, rm, rv)


def reference(x, w, b, rm, rv, dy, training, **options):
    """F.batch_norm in float64: the answer every path is held to."""
    as64 = [None if t is None else t.double() for t in (x, w, b, rm, rv, dy)]
    return run(F.batch_norm, *as64, training, **options)


NAMES = ("output", "input's gradient", "weight's gradient", "bias's gradient", "running_mean", "running_var")


def assert_matches(got, want, check=test_near, **tolerance):
    """Each of (y, dx, dw, db, running_mean, running_var) within the tolerance, as float64."""
    for name, a, r in zip(NAMES, got, want, strict=True):
        assert (a is None) == (r is None), f"{name}: {a} vs {r}"
        if a is not None:
            try:
                check(a.double(), r, **tolerance)
            except AssertionError as e:
                raise AssertionError(f"{name}: {e}") from None


def triton_ready():
    """Skip unless the Triton kernels can run: on CUDA, or in the interpreter on the CPU."""
    if tbn is None:
        pytest.skip("Triton is not installed (pip install 'minilib[triton]')")
    if not (INTERPRET or CUDA):
        pytest.skip("Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 to run in Triton's interpreter")
    return "cpu" if INTERPRET else "cuda"


@pytest.fixture
def small_triton_blocks(monkeypatch):
    """Blocks of 16 values and few programs, so tiny inputs still span several blocks and several partial
    sums per channel (the merges are what can go wrong)."""
    if tbn is not None:
        monkeypatch.setattr(tbn, "BLOCK", 16)
        monkeypatch.setattr(tbn, "TARGET_PROGRAMS", 8)


def path(name):
    """fused_batch_norm through one chosen path: 'cpp', 'torch' (the fallback) or 'triton'."""
    if name == "cpp" and cpu_bn.load_extension() is None:
        pytest.skip(f"the C++ kernel could not be built here: {cpu_bn.extension_status()}")
    if name == "triton":
        triton_ready()

    def fn(x, rm, rv, w, b, **options):
        device = "cuda" if name == "triton" and not INTERPRET else x.device
        moved = [None if t is None else t.to(device) for t in (x, rm, rv, w, b)]
        y = kernels._apply_batch_norm(name, *moved, **options)
        if rm is not None and moved[1] is not rm:  # the running buffers were updated on the device
            rm.copy_(moved[1])
            rv.copy_(moved[2])
        return y.to(x.device) if device != x.device else y

    return fn


PATHS = ["cpp", "torch", "triton"]


# --- From six sweeps to two -----------------------------------------------------------------------------


def test_fused_batch_norm_is_the_lessons_six_step_normalisation():
    """The lesson's BatchNorm in training is (x - mean) / sqrt(var + eps) * mult + add, with the mean and
    the biased variance over every dim but the channels. The fused kernel computes the same numbers in
    two sweeps: fusing changes how, not what."""
    x, w, b, _, _, _ = problem((16, 4, 6, 6))
    dims, shape = channel_dims(x), (1, -1, 1, 1)
    mean, var = x.mean(dims, keepdim=True), x.var(dims, keepdim=True, unbiased=False)
    lesson = (x - mean) / (var + 1e-5).sqrt() * w.view(shape) + b.view(shape)
    test_near(fused_batch_norm(x, None, None, w, b, training=True), lesson)


# Each shape reaches a different part of the C++ kernel: [N, C] and short runs per channel (the column
# path), runs of 64+ values gathered several rows to a block, a run longer than a block (split).
SHAPES = [(8, 3), (6, 3, 10), (4, 3, 6, 5), (3, 2, 3, 4, 5), (70, 2, 8, 8), (2, 2, 4100)]
# The interpreter runs Triton programs in numpy, slowly: it gets the small shapes.
CASES = [(n, s) for n in PATHS for s in SHAPES if n != "triton" or torch.Size(s).numel() <= 400]


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("name, shape", CASES)
def test_every_path_matches_f_batch_norm_in_float64(name, shape, training, small_triton_blocks):
    """Values, the gradients of input, weight and bias, and the running buffers, against F.batch_norm in
    float64, for [N, C] to [N, C, D, H, W] input, by each path: the C++ kernel, the torch fallback and
    the Triton kernels."""
    x, w, b, rm, rv, dy = problem(shape)
    got = run(path(name), x, w, b, rm, rv, dy, training)
    assert got[0].dtype == torch.float32 and got[0].shape == x.shape
    assert_matches(got, reference(x, w, b, rm, rv, dy, training))


@pytest.mark.parametrize("name", ["cpp", "torch"])
def test_without_weight_and_bias_it_only_normalises(name):
    """weight=None and bias=None (F.batch_norm's defaults): a mean of 0 and a variance of 1 per channel,
    and the input's gradient still goes through the statistics."""
    x, _, _, rm, rv, dy = problem((6, 4, 5, 5), affine=False)
    got = run(path(name), x, None, None, rm, rv, dy, True)
    assert_matches(got, reference(x, None, None, rm, rv, dy, True))
    test_close(got[0].mean(channel_dims(x)), torch.zeros(4), atol=1e-6)


def test_the_gradient_flows_through_the_batch_statistics():
    """A normalised channel sums to N x H x W times its bias whatever its input, so the gradient of that
    sum with respect to the input is zero. The notebook's first BatchNorm computed the statistics under
    no_grad, as constants; its gradient is then w / std everywhere, which is wrong. The fused kernel's is
    zero, as nn.BatchNorm2d's."""
    x, w, b, _, _, _ = problem((8, 3, 4, 4))
    x.requires_grad_()
    fused_batch_norm(x, None, None, w, b, training=True).sum().backward()
    test_close(x.grad, torch.zeros_like(x), atol=1e-5)

    with torch.no_grad():  # the statistics as constants
        mean, var = (
            x.mean(channel_dims(x), keepdim=True),
            x.var(channel_dims(x), keepdim=True, unbiased=False),
        )
    x.grad = None
    ((x - mean) / (var + 1e-5).sqrt() * w.view(1, -1, 1, 1)).sum().backward()
    assert x.grad.abs().min() > 0.1, "with constant statistics the gradient would not vanish"


def test_running_buffers_are_updated_in_place_with_the_unbiased_variance():
    """In training the running buffers move towards the batch's statistics, in place (the same tensors,
    as nn.BatchNorm2d's buffers): running = (1 - momentum) running + momentum batch, where the batch's
    variance is the unbiased one although the biased one normalises."""
    x, w, b, rm, rv, _ = problem((5, 3, 4, 4))
    mean_before, var_before = rm.clone(), rv.clone()
    ids = (id(rm), id(rv))
    fused_batch_norm(x, rm, rv, w, b, training=True, momentum=0.3)
    n = x.numel() // 3
    unbiased = x.double().var(channel_dims(x))  # torch's var divides by n - 1 unless told otherwise
    test_near(rm.double(), 0.7 * mean_before.double() + 0.3 * x.double().mean(channel_dims(x)))
    test_near(rv.double(), 0.7 * var_before.double() + 0.3 * unbiased)
    biased = unbiased * (n - 1) / n
    assert not torch.allclose(rv.double(), 0.7 * var_before.double() + 0.3 * biased), "not the biased one"
    assert (id(rm), id(rv)) == ids


def test_eval_normalises_with_the_running_buffers_and_leaves_them_alone():
    """In eval the running buffers normalise (not the batch's statistics), they are not changed, and the
    gradient treats them as constants: dx = w / sqrt(running_var + eps) * dy."""
    x, w, b, rm, rv, dy = problem((6, 3, 5, 5))
    before = rm.clone(), rv.clone()
    got = run(fused_batch_norm, x, w, b, rm, rv, dy, False)
    assert_matches(got, reference(x, w, b, rm, rv, dy, False))
    scale = (w / (rv + 1e-5).sqrt()).view(1, -1, 1, 1)
    test_near(got[1], dy * scale)
    assert torch.equal(got[4], before[0]) and torch.equal(got[5], before[1])


def test_running_buffers_may_be_none_in_training():
    """F.batch_norm(x, None, None, training=True): normalise with the batch's statistics, track nothing."""
    x, w, b, _, _, dy = problem((4, 3, 5))
    assert_matches(
        run(fused_batch_norm, x, w, b, None, None, dy, True), reference(x, w, b, None, None, dy, True)
    )


# --- Layouts --------------------------------------------------------------------------------------------


LAYOUTS = {
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "channels_last_3d": lambda x: x.unsqueeze(2).contiguous(memory_format=torch.channels_last_3d),
    "transposed": lambda x: x.transpose(2, 3).contiguous().transpose(2, 3),
    "every_other_column": lambda x: torch.cat([x, x], dim=3)[..., ::2],
    "channel_slice": lambda x: torch.cat([x, x[:, :1]], dim=1)[:, :-1],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_non_contiguous_and_channels_last_inputs_give_the_same_answer(layout, name, small_triton_blocks):
    """Channels-last input (NHWC in memory, what convolutions on some hardware prefer) is read in place,
    with each channel's values one per pixel; any other layout (a transpose, a strided slice) is copied to
    contiguous first. The answer is F.batch_norm's either way, for a gradient in another layout too."""
    x, w, b, rm, rv, dy = problem((4, 3, 5, 6))
    x = LAYOUTS[layout](x)
    dy = dy.reshape(x.shape).transpose(0, 1).contiguous().transpose(0, 1)  # yet another layout
    got = run(path(name), x, w, b, rm, rv, dy, True)
    assert_matches(got, reference(x, w, b, rm, rv, dy, True))
    if name == "cpp" and layout.startswith("channels_last"):
        assert got[0].stride() == x.stride(), "channels-last in, channels-last out"


# --- Precision -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
def test_inputs_with_a_large_mean_stay_within_pytorchs_own_float32_error(name, channels_last):
    """A mean of 1e4 and a std of 1: E[x^2] - E[x]^2 in float32 would lose every digit (x^2 ~ 1e8 has
    an ulp of 8). Each block is centred on its own mean first, and x - mean is taken with the mean split
    into two floats, so the output and the input's gradient are at least as close to the float64 answer
    as PyTorch's own float32 kernel gets (F.batch_norm in float32, measured on the same input)."""
    x, w, b, rm, rv, dy = problem((8, 3, 6, 6), mean=1e4, std=1.0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    want = reference(x, w, b, rm, rv, dy, True)
    ours = run(path(name), x, w, b, rm, rv, dy, True)
    pytorch = run(F.batch_norm, x, w, b, rm, rv, dy, True)
    for i, what in enumerate(NAMES[:2] + NAMES[4:]):
        ours_err = (ours[i].double() - want[i]).abs().max().item()
        pytorch_err = (pytorch[i].double() - want[i]).abs().max().item()
        # PyTorch's error, or float32's resolution of the value itself where PyTorch happens to be exact.
        allowed = max(pytorch_err, 4 * torch.finfo(torch.float32).eps * want[i].abs().max().item())
        assert ours_err <= allowed, f"{what}: error {ours_err:.3g}, PyTorch's float32 {pytorch_err:.3g}"


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 6),
    c=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 9), min_size=0, max_size=3),
    mean=st.sampled_from([0.0, 3.0, -50.0]),
    training=st.booleans(),
)
def test_any_shape_matches_f_batch_norm(n, c, spatial, mean, training):
    """Any [N, C, *] from 2-D to 5-D, short runs or long, in training or eval: F.batch_norm's values,
    gradients and running buffers (float64 reference). Runs whatever path this machine takes for CPU
    float32 (the C++ kernel where it builds)."""
    x, w, b, rm, rv, dy = problem((n, c, *spatial), mean=mean)
    assert_matches(
        run(fused_batch_norm, x, w, b, rm, rv, dy, training), reference(x, w, b, rm, rv, dy, training)
    )


def test_a_large_tensor_takes_the_streaming_path_and_matches():
    """Outputs of 16 MiB and more are written with streaming stores (no read of each line before it is
    written); a held output is never overwritten by a later call, however the kernel reuses its buffers."""
    x, w, b, rm, rv, dy = problem((64, 16, 64, 64))
    got = run(fused_batch_norm, x, w, b, rm, rv, dy, True)
    want = run(F.batch_norm, x, w, b, rm, rv, dy, True)  # float32: float64 would cost more than the test
    assert_matches(got, want, check=test_close, rtol=1e-4, atol=1e-5)
    held = got[0].clone()
    fused_batch_norm(x * 2, None, None, w, b, training=True)  # a second output of the same size
    assert torch.equal(got[0], held), "a later call wrote into an output still held"


#: What a caller may keep of an output, once it has dropped the tensor itself.
KEEPERS = {
    "the tensor": lambda y: y,
    "a view": lambda y: y[1:3],
    "its storage": lambda y: y.untyped_storage(),
    "a numpy array on its memory": lambda y: y.detach().numpy(),
}


def _bytes_of(kept):
    if isinstance(kept, torch.UntypedStorage):  # bytes(storage) would go byte by byte in Python
        return torch.empty(0, dtype=torch.uint8).set_(kept).numpy().tobytes()
    return (kept.detach().numpy() if isinstance(kept, torch.Tensor) else kept).tobytes()


def _pooled_problem():
    """A batch whose y and dx are large enough (>= 4 MiB) to come from the extension's pool."""
    if cpu_bn.load_extension() is None:
        pytest.skip(f"the C++ kernel could not be built here: {cpu_bn.extension_status()}")
    x = torch.randn(16, 8, 96, 96, generator=torch.Generator().manual_seed(0))
    assert x.numel() * 4 >= cpu_bn.POOLED_MIN_BYTES
    return x, torch.ones(8), torch.zeros(8)


@pytest.mark.parametrize("output", ["y", "dx"])
@pytest.mark.parametrize("keep", list(KEEPERS))
def test_an_output_is_never_written_again_whatever_the_caller_keeps(keep, output):
    """Large outputs reuse freed memory (fresh pages cost as much as the sweep). The caller may keep any
    handle on one (``s = y.untyped_storage()``, then ``del y``): later calls must not write into it, as
    F.batch_norm's never do. A block returns to the pool only when PyTorch frees the memory, whatever held
    it; a reuse decided from the storage's use count was fooled by a kept storage."""
    x, w, b = _pooled_problem()
    xg = x.clone().requires_grad_()
    y = fused_batch_norm(xg, None, None, w, b, training=True)
    if output == "dx":
        y.backward(torch.ones_like(y).mul_(x))
        y = xg.grad
        xg.grad = None
    kept = KEEPERS[keep](y)
    before = _bytes_of(kept)
    del y
    for scale in (2.0, 3.0):  # later calls of the same size, forward and backward
        x2 = (x * scale).requires_grad_()
        fused_batch_norm(x2, None, None, w, b, training=True).backward(torch.ones_like(x).mul_(x))
        del x2
    assert _bytes_of(kept) == before, f"an output ({output}) kept as {keep} was overwritten by a later call"


def test_an_output_sent_to_another_process_is_never_written_again():
    """torch.multiprocessing moves a tensor it sends into shared memory, and the sender may then drop its
    own reference: the sender's later calls must not write into what the other process holds. The child
    is forked and killed if it has not finished within its bound."""
    x, w, b = _pooled_problem()
    with another_process_holding() as holder:
        y = fused_batch_norm(x, None, None, w, b, training=True)
        sent = y.tolist()
        holder.send(y)
        del y  # only the other process holds the output now
        for scale in (2.0, 3.0):
            fused_batch_norm(x * scale + 5.0, None, None, w, b, training=True)
        held = holder.held()
    assert held == sent, "an output held by another process was overwritten by the sender's next call"


def test_a_freed_output_block_is_reused_and_can_be_released():
    """The pool does reuse: once the caller lets go of an output, the next call of that size gets the same
    memory (no page faults); ``release_output_memory()`` gives the kept blocks back."""
    x, w, b = _pooled_problem()
    y = fused_batch_norm(x, None, None, w, b, training=True)
    ptr = y.data_ptr()
    del y
    y = fused_batch_norm(x, None, None, w, b, training=True)
    assert y.data_ptr() == ptr, "a freed block of the same size was not reused"
    cpu_bn.release_output_memory()
    test_near(y.double(), F.batch_norm(x.double(), None, None, w.double(), b.double(), training=True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes_take_the_torch_path(dtype):
    """CPU float64 and half precision have no C++ kernel: the torch path computes them (half in float32)
    and returns the input's dtype."""
    x, w, b, rm, rv, dy = problem((4, 3, 5, 5), dtype=dtype)
    assert kernels.batch_norm_backend(x).startswith("torch")
    got = run(fused_batch_norm, x, w, b, rm, rv, dy, True)
    assert got[0].dtype == dtype
    if dtype == torch.float64:
        assert_matches(got, reference(x, w, b, rm, rv, dy, True), check=test_close)
    else:
        assert_matches(got, reference(x, w, b, rm, rv, dy, True), check=test_close, rtol=2e-2, atol=2e-2)


def test_second_derivatives_are_pytorchs():
    """A gradient penalty differentiates the gradient again (create_graph=True): the kernels' backward
    then runs through torch ops' graph, so the second derivatives are F.batch_norm's."""
    x, w, b, _, _, _ = problem((4, 3, 4, 4))

    def penalty(fn):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xs, None, None, ws, b, training=True)
        (g,) = torch.autograd.grad((y**3).sum(), xs, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), [xs, ws])

    for a, r in zip(penalty(fused_batch_norm), penalty(F.batch_norm), strict=True):
        test_near(a, r)


# --- FusedBatchNorm2d: a drop-in nn.BatchNorm2d --------------------------------------------------------


def cnn(norm):
    """Lesson 07's layer order, tiny: conv (no bias) -> ReLU -> batch norm, three times, then a head."""
    layers = []
    for ni, nf in [(1, 4), (4, 8), (8, 8)]:
        layers += [nn.Conv2d(ni, nf, 3, stride=2, padding=1, bias=False), nn.ReLU(), norm(nf)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def test_fused_batchnorm2d_trains_a_cnn_to_nn_batchnorm2ds_parameters():
    """The same CNN with FusedBatchNorm2d and with nn.BatchNorm2d, from the same weights, on the same
    batches (SGD, five steps, then an eval pass): every parameter and running buffer ends equal within
    float rounding, and so do the predictions."""
    torch.manual_seed(0)
    fused, plain = cnn(FusedBatchNorm2d), cnn(nn.BatchNorm2d)
    plain.load_state_dict(fused.state_dict())
    xs, ys = torch.randn(5, 16, 1, 16, 16), torch.randint(0, 10, (5, 16))
    for model in (fused, plain):
        opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        for x, y in zip(xs, ys, strict=True):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    for (name, a), (_, r) in zip(fused.state_dict().items(), plain.state_dict().items(), strict=True):
        try:
            test_close(a.double(), r.double(), rtol=1e-4, atol=1e-5)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
    fused.eval()
    plain.eval()
    test_close(fused(xs[0]), plain(xs[0]), rtol=1e-4, atol=1e-5)


def test_fused_batchnorm2d_and_nn_batchnorm2d_load_each_others_state():
    """Same parameters, buffers and state_dict keys as nn.BatchNorm2d (num_batches_tracked too), so a
    checkpoint moves between them both ways; and it is an nn.BatchNorm2d for isinstance checks."""
    fused, plain = FusedBatchNorm2d(5), nn.BatchNorm2d(5)
    assert isinstance(fused, nn.BatchNorm2d)
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in plain.named_parameters()]
    with torch.no_grad():
        plain.weight.uniform_(), plain.bias.uniform_(), plain.running_mean.uniform_()
        plain.num_batches_tracked.fill_(7)
    fused.load_state_dict(plain.state_dict())
    back = nn.BatchNorm2d(5)
    back.load_state_dict(fused.state_dict())
    for a, r in zip(back.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, r)
    x = torch.randn(4, 5, 3, 3)
    fused.eval()
    plain.eval()
    test_near(fused(x), plain(x))


@pytest.mark.parametrize("momentum", [None, 0.1, 0.5])
def test_fused_batchnorm2d_momentum_none_is_the_cumulative_average(momentum):
    """momentum=None in nn.BatchNorm2d means the plain average of every batch's statistics so far
    (factor 1 / num_batches_tracked). FusedBatchNorm2d follows the same rule (the function itself, like
    F.batch_norm, wants a float)."""
    fused, plain = FusedBatchNorm2d(3, momentum=momentum), nn.BatchNorm2d(3, momentum=momentum)
    for _ in range(4):
        x = torch.randn(6, 3, 4, 4) * 3 + 2
        test_near(fused(x), plain(x))
    test_near(fused.running_mean, plain.running_mean)
    test_near(fused.running_var, plain.running_var)
    assert int(fused.num_batches_tracked) == int(plain.num_batches_tracked) == 4


# --- Building the C++ kernel ---------------------------------------------------------------------------


def test_cpu_float32_runs_the_compiled_kernel():
    """With a C++ compiler and ninja, CPU float32 takes the C++ kernel (built once, then cached). In CI the
    build must work; elsewhere a machine without a compiler skips this (and uses the fallback)."""
    if os.environ.get("MINILIB_NO_EXTENSION") == "1":
        pytest.skip("MINILIB_NO_EXTENSION=1: the fallback is forced")
    backend = kernels.batch_norm_backend(torch.zeros(2, 3))
    if backend != "cpp" and not os.environ.get("CI"):
        pytest.skip(f"the C++ kernel could not be built here: {backend}")
    assert backend == "cpp", backend


def test_a_failed_build_warns_once_and_the_fallback_runs(monkeypatch):
    """If the compiler or ninja is missing, the user is told once, not at every step, and still gets
    F.batch_norm's answer (the failed build is simulated here)."""
    monkeypatch.delenv("MINILIB_NO_EXTENSION", raising=False)
    monkeypatch.setattr(cpu_bn, "_state", {"module": None, "tried": False, "error": None})
    monkeypatch.setattr(cpu_bn, "_build", lambda: (None, "simulated: no C++ compiler"))
    x, w, b, rm, rv, dy = problem((4, 3, 5, 5))
    with pytest.warns(RuntimeWarning, match="could not build the C.. kernel .simulated") as seen:
        for _ in range(2):
            assert_matches(
                run(fused_batch_norm, x, w, b, rm, rv, dy, True), reference(x, w, b, rm, rv, dy, True)
            )
    assert len([w for w in seen if issubclass(w.category, RuntimeWarning)]) == 1
    assert kernels.batch_norm_backend(x).startswith("torch")


# --- The Triton kernels, in the interpreter without a GPU ----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_triton_kernels_handle_half_precision(dtype, training, small_triton_blocks):
    """Float16 input is computed in float32 and written back in float16: within float16's rounding of
    the float64 answer (rtol 1e-2), with float32 running buffers and parameters too (mixed precision)."""
    x, w, b, rm, rv, dy = problem((6, 3, 5, 4), dtype=dtype)
    w, b, rm, rv = (t.float() for t in (w, b, rm, rv))
    got = run(path("triton"), x, w, b, rm, rv, dy, training)
    assert got[0].dtype == dtype and got[0].device.type == "cpu"
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert_matches(got, reference(x, w, b, rm, rv, dy, training), check=test_close, **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or tbn is None or INTERPRET, reason="needs CUDA and compiled Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_fused_batch_norm_matches_pytorch(dtype):
    """On a GPU, fused_batch_norm runs the Triton kernels at the lesson's shape."""
    x, w, b, rm, rv, dy = problem((64, 64, 28, 28), dtype=dtype)
    w, b, rm, rv = (t.float() for t in (w, b, rm, rv))
    cuda = [t.cuda() for t in (x, w, b, rm, rv, dy)]
    assert kernels.batch_norm_backend(cuda[0]) == "triton"
    got = run(fused_batch_norm, *cuda, True)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert_matches([t.cpu() for t in got], reference(x, w, b, rm, rv, dy, True), check=test_close, **tol)
