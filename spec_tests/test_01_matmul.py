"""Lesson 01 (notebooks 00_exports and 01_matmul): matrix multiplication, from three Python loops to `@`.

The lesson starts with tiny test helpers (`test`, `test_eq`, `near`, `test_near`) and then writes
``c[i, j] = sum_k a[i, k] * b[k, j]`` four ways, checking each against the triple loop and against
PyTorch's ``@``. Each step hands one more loop from the Python interpreter to PyTorch's C code: the
elementwise product replaces the loop over k with one ``(row * column).sum()``; broadcasting replaces
the loop over j by stretching a row across all of ``b`` without copying it (stride 0); einsum and
``@`` leave no Python loop at all. The notebook timed them on five MNIST images (5x784 @ 784x10):
835 ms, 1.39 ms, 254 us, 57 us, 18 us. Timing is the benchmarks' job (``nox -s bench``); here we
show WHY it goes that way by counting how many calls into PyTorch each version makes from Python.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from minilib.matmul import MATMULS, matmul_broadcast, matmul_loops
from minilib.testing import near, test, test_close, test_eq, test_near, test_near_zero

pytestmark = pytest.mark.lesson01

FAST = {name: f for name, f in MATMULS.items() if name != "loops"}


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------- lesson 00: the helpers


def test_near_accepts_float32_rounding_but_not_a_real_error():
    """`near` is the course's ``allclose(rtol=1e-3, atol=1e-5)``: loose enough for float32 sums taken
    in a different order, tight enough to catch a wrong result."""
    a = torch.tensor([1.0, 100.0, 0.0])
    test_near(a, a + torch.tensor([5e-4, 5e-2, 5e-6]))  # within rtol (and atol at zero)
    assert not near(a, a + torch.tensor([0.0, 0.5, 0.0]))  # 0.5% off is an error, not rounding


def test_test_near_failure_shows_both_sides_and_the_max_difference():
    """A failed comparison must say by how much it failed, or a reader cannot tell rounding from a bug."""
    with pytest.raises(AssertionError, match=r"near:[\s\S]*max abs diff 0\.25") as e:
        test_near(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.25]))
    assert "2.2500" in str(e.value) and "1.0000" in str(e.value)  # both sides shown


def test_near_never_passes_a_column_for_a_row():
    """``allclose`` broadcasts: a [3, 1] column against a [3] row compares a 3x3 grid and may pass.
    That is the bug lesson 02's MSE hits (output [N, 1], targets [N]), so `near` refuses other shapes;
    only a plain number may stand for every element."""
    col, row = torch.zeros(3, 1), torch.zeros(3)
    assert torch.allclose(col, row)  # PyTorch's allclose is fooled...
    assert not near(col, row)  # ...near is not
    test_near(row, 0.0)


def test_near_compares_float32_with_float64_by_value():
    """``allclose`` raises on mixed dtypes; comparing a float32 result with a float64 reference is what
    these tests do all the time, so `near` compares in the wider dtype."""
    x = randn(4, 4)
    test_near(x, x.double())


def test_test_close_takes_your_tolerance_or_pytorchs_for_the_dtype():
    """Where the course's tolerance is not the point, `test_close` compares with
    ``torch.testing.assert_close``: your rtol/atol, else PyTorch's per-dtype defaults (float64 1e-7,
    float32 1.3e-6), so a float64 rewrite is held to float64 accuracy."""
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    test_close(x, x + 1e-9)  # float64's rounding
    with pytest.raises(AssertionError, match=r"max abs diff 1e-05"):
        test_close(x, x + 1e-5)  # not float64's rounding
    test_close(x, x + 1e-5, rtol=1e-3, atol=1e-5)  # unless you say so
    test_close(x.float(), x + 1e-7)  # float32 against a float64 reference: compared in float64


def test_test_near_zero_checks_every_element_against_the_tolerance():
    """`test_near_zero(a, tol=1e-3)` is how lesson 02 checks a mean ~0 after normalising."""
    test_near_zero(torch.tensor([5e-4, -9e-4]))
    with pytest.raises(AssertionError, match=r"max abs 0\.002.*tolerance 0\.001"):
        test_near_zero(torch.tensor([5e-4, -2e-3]))
    test_near_zero(0.05, tol=0.1)


def test_test_eq_compares_whole_tensors_and_plain_values():
    """`test_eq` is ``==``; for tensors it means same shape and every element equal (a bare ``==`` on
    tensors is itself a tensor, whose truth is ambiguous)."""
    test_eq(3, 3)
    test_eq(torch.arange(3), torch.tensor([0, 1, 2]))
    with pytest.raises(AssertionError, match="=="):
        test_eq(torch.arange(3), torch.tensor([0, 1, 3]))
    with pytest.raises(AssertionError):
        test_eq(torch.zeros(3), torch.zeros(3, 1))


def test_test_takes_any_comparison_and_names_it():
    """`test(a, b, cmp, cname)` is the general form the others are built on."""
    test(1, 2, lambda a, b: a < b, "less")
    with pytest.raises(AssertionError, match="^less:"):
        test(2, 1, lambda a, b: a < b, "less")


def test_helpers_are_not_collected_as_tests_by_pytest():
    """The helpers' lesson names start with ``test``; ``__test__ = False`` keeps pytest from running
    them as tests when a spec file imports them."""
    assert all(f.__test__ is False for f in (test, test_eq, test_near, test_near_zero, test_close))


# ------------------------------------------------------------------------------- lesson 01: matmuls


def test_the_reference_table_lists_the_lessons_matmuls_in_order():
    """One table (name -> function) that the tests and the benchmarks parametrize over."""
    assert list(MATMULS) == ["loops", "elementwise", "broadcast", "einsum", "torch"]


@pytest.fixture(scope="module")
def five_images():
    """The notebook's case: five 784-pixel rows (here random) times a 784x10 weight matrix, and the
    triple loop's answer (39,200 multiply-adds in Python: computed once for the whole module)."""
    a, b = randn(5, 784, seed=1), randn(784, 10, seed=2)
    return a, b, matmul_loops(a, b)


def test_triple_loop_agrees_with_the_at_operator_on_five_images(five_images):
    """The loop is the definition; ``@`` is PyTorch's BLAS kernel. In float32 the two add the 784
    products in a different order, so they agree within `near`, not bit for bit."""
    a, b, by_loops = five_images
    test_near(by_loops, a @ b)


@pytest.mark.parametrize("name", list(FAST))
def test_each_faster_matmul_agrees_with_the_triple_loop_on_five_images(name, five_images):
    """Every rewrite must compute the same thing as the loop it replaces (float32, course tolerance)."""
    a, b, by_loops = five_images
    test_near(FAST[name](a, b), by_loops)


@pytest.mark.parametrize("name", list(MATMULS))
def test_each_matmul_agrees_with_the_at_operator_in_float64(name):
    """In float64 the summation order hardly matters, so every version must match ``@`` to ~1e-12."""
    a, b = randn(7, 13, dtype=torch.float64, seed=3), randn(13, 5, dtype=torch.float64, seed=4)
    c = MATMULS[name](a, b)
    test_close(c, a @ b)


# ------------------------------------------------------------------------- broadcasting, by example


def test_a_scalar_broadcasts_to_every_element():
    """``a > 0`` or ``a + 1``: the scalar acts as if copied to a's shape, without being copied."""
    a = torch.tensor([10.0, 6.0, -4.0])
    test_eq(a > 0, torch.tensor([True, True, False]))
    test_eq(a + 1, torch.tensor([11.0, 7.0, -3.0]))


def test_a_vector_broadcasts_across_the_rows_of_a_matrix():
    """``m + c`` adds the vector c to every row of m."""
    c = torch.tensor([10.0, 20, 30])
    m = torch.tensor([[1.0, 2, 3], [4, 5, 6], [7, 8, 9]])
    test_eq(m + c, torch.tensor([[11.0, 22, 33], [14, 25, 36], [17, 28, 39]]))


def test_expand_as_stretches_a_vector_with_stride_zero_without_copying():
    """Broadcasting is free in memory: the stretched row has stride 0 along the new dimension, i.e.
    every "row" is the same three numbers, stored once."""
    c = torch.tensor([10.0, 20, 30])
    t = c.expand_as(torch.empty(3, 3))
    test_eq(t.shape, torch.Size([3, 3]))
    test_eq(t.stride(), (0, 1))
    assert t.data_ptr() == c.data_ptr()  # no copy: same storage
    test_eq(t, torch.stack([c, c, c]))


def test_unsqueeze_and_none_indexing_add_a_unit_axis():
    """``c.unsqueeze(0)`` / ``c[None]`` make a 1x3 row; ``c.unsqueeze(1)`` / ``c[:, None]`` a 3x1
    column. Which one you make decides which way the vector broadcasts."""
    c = torch.tensor([10.0, 20, 30])
    test_eq(c.unsqueeze(0).shape, torch.Size([1, 3]))
    test_eq(c.unsqueeze(1).shape, torch.Size([3, 1]))
    test_eq(c[None], c.unsqueeze(0))
    test_eq(c[:, None], c.unsqueeze(1))
    test_eq(c[..., None].shape, torch.Size([3, 1]))  # `...` means "all the leading axes"
    m = torch.ones(3, 3)
    test_eq(m * c[None], torch.stack([c, c, c]))  # the row goes down the rows
    test_eq(m * c[:, None], torch.stack([c, c, c]).t())  # the column goes across the columns


def test_a_column_times_a_row_broadcasts_to_their_outer_product():
    """Both operands stretch: [3, 1] * [1, 3] -> [3, 3]. Shapes are compared from the last axis; two
    sizes match when equal or when one of them is 1."""
    c = torch.tensor([1.0, 2, 3])
    test_eq(c[:, None] * c[None, :], torch.outer(c, c))
    with pytest.raises(RuntimeError):
        torch.ones(3, 2) * torch.ones(3)  # trailing sizes 2 and 3: neither is 1, no broadcast


def test_frobenius_norm_of_one_to_nine_is_16_8819():
    """The lesson's exercise: sqrt(sum of squares) of [[1..9]], written with broadcasting as
    ``(m * m).sum().sqrt()``; 1 + 4 + ... + 81 = 285 and sqrt(285) = 16.8819."""
    m = torch.arange(1.0, 10).reshape(3, 3)
    frobenius = (m * m).sum().sqrt()
    test_near(frobenius, 16.8819)
    test_near(frobenius, torch.linalg.matrix_norm(m, ord="fro"))


def test_broadcast_matmul_is_one_row_as_a_column_times_all_of_b():
    """Row i of the product is ``(a[i].unsqueeze(-1) * b).sum(0)``: a [k, 1] column stretched across
    b's n columns, multiplied elementwise, summed down the k axis."""
    a, b = randn(4, 6, dtype=torch.float64, seed=5), randn(6, 3, dtype=torch.float64, seed=6)
    row0 = (a[0].unsqueeze(-1) * b).sum(0)
    test_close(row0, (a @ b)[0])
    test_close(matmul_broadcast(a, b)[0], row0)


def test_einsum_spells_the_product_in_index_notation():
    """``einsum('ik,kj->ij')``: the index k appears in both inputs and not in the output, so it is
    summed over; the same string with ``->ikj`` keeps every product instead."""
    a, b = randn(4, 6, dtype=torch.float64, seed=7), randn(6, 3, dtype=torch.float64, seed=8)
    test_close(torch.einsum("ik,kj->ij", a, b), a @ b)
    test_close(torch.einsum("ik,kj->ikj", a, b).sum(1), a @ b)


# --------------------------------------------------------------------- why each step is faster


class _CountTorchCalls(TorchFunctionMode):
    """Counts the calls into PyTorch made from Python (indexing, arithmetic, sum...): each is one trip
    from the interpreter into C, and the trip, not the arithmetic, is what costs at these sizes."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _calls(f, m: int, k: int, n: int) -> int:
    a, b = randn(m, k), randn(k, n)
    with _CountTorchCalls() as counter:
        f(a, b)
    return counter.calls


# Which of the three loops (over m rows, k inner products, n columns) each version still runs in Python.
PYTHON_LOOPS = {"loops": "mkn", "elementwise": "mn", "broadcast": "m", "einsum": "", "torch": ""}


@pytest.mark.parametrize("name", list(MATMULS))
def test_each_step_moves_one_more_loop_from_python_into_c(name):
    """Why the timings fall by orders of magnitude: the triple loop makes a few calls into PyTorch per
    multiply-add (m*n*k of them); the elementwise version one ``(row * col).sum()`` per output (m*n);
    broadcasting one per row (m); einsum and ``@`` a fixed handful, whatever the size, and the loops
    run in C (for ``@``, in a BLAS kernel using SIMD and every core). Doubling a size multiplies the
    Python-side work only along the axes a version still loops over in Python."""
    base = {"m": 2, "k": 3, "n": 4}
    calls = _calls(MATMULS[name], **base)
    for axis in "mkn":
        doubled = _calls(MATMULS[name], **{**base, axis: 2 * base[axis]})
        if axis in PYTHON_LOOPS[name]:
            assert doubled > calls, (
                f"{name}: doubling {axis} should add Python-side calls ({calls} -> {doubled})"
            )
        else:
            assert doubled == calls, (
                f"{name}: {axis} is looped over in C, yet calls went {calls} -> {doubled}"
            )
    assert PYTHON_LOOPS[name] or calls < 20, f"{name}: a loop-free version made {calls} calls"


def test_python_side_calls_fall_at_every_step_of_the_lesson():
    """On the same 5x784 @ 784x10 case as the notebook: loops >> elementwise >> broadcast >> einsum."""
    counts = [_calls(f, 2, 16, 10) for f in MATMULS.values()]
    assert counts[0] > counts[1] > counts[2] > counts[3] >= counts[4], dict(zip(MATMULS, counts, strict=True))


# -------------------------------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(0, 9),
    k=st.integers(0, 9),
    n=st.integers(0, 9),
    seed=st.integers(0, 2**31 - 1),
    name=st.sampled_from(list(FAST)),
)
def test_fast_matmuls_equal_torch_matmul_for_any_shape(m, k, n, seed, name):
    """Any m x k times k x n, empty ones included (an empty inner size gives zeros), in float64."""
    a, b = randn(m, k, dtype=torch.float64, seed=seed), randn(k, n, dtype=torch.float64, seed=seed + 1)
    c = FAST[name](a, b)
    assert c.shape == (m, n)
    test_close(c, torch.matmul(a, b))


@pytest.mark.parametrize("name", list(MATMULS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_result_keeps_the_inputs_dtype(name, dtype):
    """Results come back in the inputs' dtype and device: integers stay integers, float64 stays float64.
    (What each refuses, and that none modifies its inputs, is in test_contracts.py.)"""
    a, b = randn(3, 4, seed=9).mul(4).to(dtype), randn(4, 2, seed=10).mul(4).to(dtype)
    c = MATMULS[name](a, b)
    assert (c.dtype, c.device) == (dtype, a.device)
    test_near(c, a @ b)
