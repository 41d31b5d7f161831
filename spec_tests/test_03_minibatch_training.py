"""Lesson 03 (03_minibatch_training): cross-entropy from scratch, then a training loop refactored in steps.

The notebook first builds the loss of a classifier: softmax turns a row of scores into probabilities
that sum to 1; its log turns the likelihood (a product of probabilities) into a sum; the NEGATIVE
log likelihood of the right class, picked by integer array indexing, is a loss to minimise. Three
versions of log_softmax show why the LogSumExp trick (subtract the row max first) is needed: the
first two overflow on large logits, the third is finite for any finite logits. Each matches PyTorch's
F.log_softmax / F.nll_loss / F.cross_entropy, values and gradients. Then a minibatch training loop
(bs 64, lr 0.5, 50 hidden units, one epoch: valid accuracy > 0.7) is refactored one idea at a time:
layers registered by nn.Module (re-created by DummyModule's __setattr__), add_module, nn.ModuleList,
nn.Sequential; an Optimizer whose step and zero_grad run under no_grad (optim.SGD); Dataset,
Sampler, collate, DataLoader (PyTorch's); and finally ``fit`` with a validation pass in eval mode,
without gradients, averaged over samples. The tests answer the questions learners asked about it
(why softmax and its log, why "negative", why LogSumExp is a trick, why ``__setattr__``, why
``no_grad`` in the optimizer, why weighted validation averages and a twice-as-large validation batch,
why ``train()``/``eval()``, and "is my loss better because of my method, or because I re-ran the cell?"),
each by an example that could fail.

Data: the MNIST sample (8,000 train / 2,000 valid), unnormalised as in the notebook.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import RandomSampler, SequentialSampler

from minilib.data import DataBunch, DataLoader, Dataset, Sampler, collate, get_dls
from minilib.figures import softmax_nll_figure
from minilib.loss import (
    LOG_SOFTMAXES,
    accuracy,
    cross_entropy,
    log_softmax,
    logsumexp,
    nll,
    softmax,
)
from minilib.nn import DummyModule, Optimizer, SequentialModel, fit
from minilib.testing import test_close, test_near

pytestmark = pytest.mark.lesson03

NH, BS, LR = 50, 64, 0.5  # the notebook's hidden units, batch size and learning rate


# ---------------------------------------------------------------------------------------------------
# Helpers: the data, the lesson's models, and one epoch of the hand-written training loop.


@pytest.fixture(scope="module")
def data(mnist_sample):
    """(x_train, y_train, x_valid, y_valid): pixels in [0, 1] (unnormalised, as the notebook's 03)."""
    return mnist_sample


def _valid_accuracy(model, x_valid: torch.Tensor, y_valid: torch.Tensor) -> float:
    with torch.no_grad():
        return accuracy(model(x_valid), y_valid).item()


def _train_one_epoch_by_hand(model, params, x: torch.Tensor, y: torch.Tensor) -> None:
    """The notebook's loop: predict, loss, backward, then update each parameter and zero its gradient
    under no_grad. ``params`` returns the tensors to update (the refactors differ in how they find them)."""
    for i in range(0, len(x), BS):
        xb, yb = x[i : i + BS], y[i : i + BS]
        loss = cross_entropy(model(xb), yb)
        loss.backward()
        with torch.no_grad():
            for p in params():
                p -= p.grad * LR
                p.grad.zero_()


def _train_one_epoch(model, opt, batches) -> None:
    """The loop once an optimizer exists: ``opt.step(); opt.zero_grad()``."""
    for xb, yb in batches:
        cross_entropy(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()


class PlainListModel:
    """The notebook's first model: its layers in a plain Python list, so nothing registers them and
    the training loop must walk the list and update each layer's weight and bias itself."""

    def __init__(self, n_in: int, nh: int, n_out: int):
        self.layers = [nn.Linear(n_in, nh), nn.ReLU(), nn.Linear(nh, n_out)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def weights_and_biases(self) -> list[torch.Tensor]:
        return [p for layer in self.layers if hasattr(layer, "weight") for p in (layer.weight, layer.bias)]


class AttributeModel(nn.Module):
    """Layers set as attributes of an nn.Module are registered by its __setattr__: parameters() finds them."""

    def __init__(self, n_in: int, nh: int, n_out: int):
        super().__init__()
        self.l1 = nn.Linear(n_in, nh)
        self.l2 = nn.Linear(nh, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(F.relu(self.l1(x)))


class AddModuleModel(nn.Module):
    """A list of layers is not registered by itself; add_module registers each one by hand."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = layers
        for i, layer in enumerate(layers):
            self.add_module(f"layer_{i}", layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _three_layers() -> list[nn.Module]:
    return [nn.Linear(784, NH), nn.ReLU(), nn.Linear(NH, 10)]


def _sequential() -> nn.Sequential:
    return nn.Sequential(*_three_layers())


# ---------------------------------------------------------------------------------------------------
# Cross-entropy from scratch.


def test_untrained_model_loss_is_about_ln_10(data):
    """Before training, the model has no preference among the 10 digits: each gets probability ~1/10,
    so the cross-entropy is about -log(1/10) = ln 10 = 2.30 (the notebook's first printed loss)."""
    x_train, y_train, _, _ = data
    model = AttributeModel(784, NH, 10)
    with torch.no_grad():
        loss = cross_entropy(model(x_train), y_train).item()
    assert abs(loss - math.log(10)) < 0.15, (
        f"untrained loss {loss:.3f}, expected ~ln(10) = {math.log(10):.3f}"
    )


def test_softmax_gives_rows_of_probabilities_that_sum_to_1():
    """Why softmax at the last layer: it turns any row of scores into probabilities, positive and summing
    to 1, keeping the order of the scores. It equals F.softmax."""
    x = torch.randn(6, 10, dtype=torch.float64) * 3
    p = softmax(x)
    assert bool((p > 0).all())
    test_near(p.sum(-1), torch.ones(6, dtype=torch.float64))
    test_close(p, F.softmax(x, dim=-1))
    assert torch.equal(p.argmax(-1), x.argmax(-1))


def test_log_turns_a_product_of_probabilities_into_a_sum_that_does_not_underflow():
    """Why the LOG of softmax: the likelihood of a dataset's labels is a product of one probability per
    sample. For 1,000 samples of probability ~0.1 that product is 1e-1000: zero even in float64. The
    log of the product is the sum of the logs, -2303, perfectly representable."""
    p = torch.full((1000,), 0.1, dtype=torch.float64)
    assert p.prod().item() == 0.0, "the product of 1000 probabilities underflows"
    assert p.log().sum().item() == pytest.approx(1000 * math.log(0.1))


def test_nll_picks_each_rows_target_by_integer_array_indexing():
    """nll(input, target) = -input[range(n), target].mean(): the indexing picks row i's entry in column
    target[i], the log-probability the model gave to the right class. It equals F.nll_loss."""
    logp = torch.log_softmax(torch.randn(4, 5, dtype=torch.float64), -1)
    target = torch.tensor([3, 0, 4, 0])
    picked = logp[[0, 1, 2, 3], [3, 0, 4, 0]]
    assert torch.equal(logp[torch.arange(4), target], picked)
    test_close(nll(logp, target), -picked.mean())
    test_close(nll(logp, target), F.nll_loss(logp, target))


def test_minimising_negative_log_likelihood_maximises_the_right_class_probability():
    """Why NEGATIVE log likelihood: we minimise losses. -log(p) is 0 at p = 1 and grows without bound as
    p -> 0, so it is smallest exactly where the likelihood is largest. One gradient step on the logits
    against nll(log_softmax) raises the probability of the target class."""
    p = torch.linspace(0.01, 1.0, 100, dtype=torch.float64)
    nl = -p.log()
    assert bool((nl[1:] < nl[:-1]).all()), "-log p decreases as p grows"
    assert nl[-1].item() == 0.0 and int(nl.argmin()) == len(p) - 1
    logits = torch.zeros(1, 10, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([3])
    nll(log_softmax(logits), target).backward()
    with torch.no_grad():
        stepped = logits - 1.0 * logits.grad
    assert softmax(stepped)[0, 3].item() > softmax(logits.detach())[0, 3].item() == pytest.approx(0.1)


def test_softmax_nll_figure_plots_softmax_and_minus_log_p():
    """The lesson's two curves as a figure: the softmax probability of one class as its logit sweeps
    -10..10 (the other 9 at 0), 1/10 when all are equal; and -log(p), 0 at p = 1."""
    fig = softmax_nll_figure(n_classes=10)
    left, right = fig.axes
    z = torch.as_tensor(left.lines[0].get_xdata(), dtype=torch.float64)
    p_plotted = torch.as_tensor(left.lines[0].get_ydata(), dtype=torch.float64)
    rows = torch.zeros(len(z), 10, dtype=torch.float64)
    rows[:, 0] = z
    test_close(p_plotted, F.softmax(rows, -1)[:, 0])
    middle = len(z) // 2  # the logit 0: all ten logits equal, so each class gets 1/10
    assert z[middle].item() == pytest.approx(0.0, abs=1e-12) and p_plotted[middle].item() == pytest.approx(
        0.1
    )
    p = torch.as_tensor(right.lines[0].get_xdata(), dtype=torch.float64)
    test_close(torch.as_tensor(right.lines[0].get_ydata(), dtype=torch.float64), -p.log())
    assert right.lines[0].get_ydata()[-1] == 0.0


@pytest.mark.parametrize("version", list(LOG_SOFTMAXES))
def test_every_lesson_log_softmax_matches_pytorch_on_ordinary_logits(version):
    """All three versions are the same function mathematically: on ordinary logits each equals
    F.log_softmax, values and gradients (autograd through ours against autograd through theirs)."""
    x = torch.randn(8, 10, dtype=torch.float64) * 4
    upstream = torch.randn(8, 10, dtype=torch.float64)
    ours_x, theirs_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = LOG_SOFTMAXES[version](ours_x), F.log_softmax(theirs_x, dim=-1)
    test_close(ours, theirs)
    (ours * upstream).sum().backward()
    (theirs * upstream).sum().backward()
    test_close(ours_x.grad, theirs_x.grad)


def test_logsumexp_trick_keeps_huge_logits_finite():
    """exp(1000) overflows float32, so log(sum(exp(x))) computed naively is inf. Subtracting the row max
    first changes nothing mathematically (log-sum-exp is shift-invariant) and keeps every exp() at most 1."""
    x = torch.tensor([[1000.0, 1000.0]])
    assert torch.isinf(x.exp().sum(-1).log()).all()  # the naive way overflows
    test_near(logsumexp(x), torch.tensor([1000.0 + math.log(2)]))  # the trick does not
    test_near(logsumexp(x), torch.logsumexp(x, dim=-1))


def test_subtracting_the_max_changes_nothing_mathematically():
    """Why the trick is allowed: log(sum(exp(x))) = m + log(sum(exp(x - m))) for any m, since
    exp(x - m) = exp(x) / exp(m). Shifting every logit by c shifts logsumexp by c and leaves log_softmax
    unchanged."""
    x = torch.randn(5, 7, dtype=torch.float64)
    naive = x.exp().sum(-1).log()
    for m in (-3.0, 0.0, 2.5, float(x.max())):
        test_close(m + (x - m).exp().sum(-1).log(), naive)
    test_close(logsumexp(x + 100.0), logsumexp(x) + 100.0)
    test_close(log_softmax(x + 100.0), log_softmax(x), rtol=1e-9, atol=1e-9)


EXTREME_LOGITS = {
    "huge positive": [[1e4, 0.0, -5.0], [1e4, 1e4, 0.0]],
    "huge negative": [[-1e4, -1e4 + 1.0, -1e4 + 5.0], [-1e4, -1e4, -1e4]],
    "mixed": [[1e4, -1e4, 0.0], [-1e4, 0.0, 1e4]],
}


@pytest.mark.parametrize("case", list(EXTREME_LOGITS))
def test_naive_log_softmax_versions_break_where_the_final_one_stays_finite(case):
    """The lesson's evolution, on logits of size 1e4 in float32: the log of the softmax (exp overflows
    to inf, or underflows to 0 for every class, giving nan) and x - log(sum(exp(x))) both produce inf or
    nan; x - logsumexp(x) is finite everywhere."""
    x = torch.tensor(EXTREME_LOGITS[case])
    for version in ("naive", "sum_log"):
        out = LOG_SOFTMAXES[version](x)
        assert not bool(torch.isfinite(out).all()), f"{version} should break on {case} logits, gave {out}"
    final = LOG_SOFTMAXES["logsumexp"](x)
    assert bool(torch.isfinite(final).all()), f"the final version gave {final}"


@pytest.mark.parametrize("case", list(EXTREME_LOGITS))
def test_final_log_softmax_and_logsumexp_match_pytorch_on_extreme_logits(case):
    """Finite is not enough: on those logits log_softmax equals F.log_softmax and logsumexp equals
    torch.logsumexp in float32, and so do their gradients."""
    x = torch.tensor(EXTREME_LOGITS[case])
    upstream = torch.randn(x.shape)
    ours_x, theirs_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = log_softmax(ours_x), F.log_softmax(theirs_x, dim=-1)
    test_near(ours, theirs)
    (ours * upstream).sum().backward()
    (theirs * upstream).sum().backward()
    test_near(ours_x.grad, theirs_x.grad)

    ours_x, theirs_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = logsumexp(ours_x), torch.logsumexp(theirs_x, dim=-1)
    test_near(ours, theirs)
    ours.sum().backward()
    theirs.sum().backward()
    test_near(ours_x.grad, theirs_x.grad)


def test_a_row_of_minus_infinity_gives_what_pytorch_gives():
    """A row where every class is impossible (-inf) has logsumexp -inf, as torch.logsumexp says, and a
    log_softmax of nan (-inf - -inf), as F.log_softmax says; the max trick must not turn that into
    anything else, nor spoil the other rows (a single -inf entry gives log-probability -inf)."""
    inf = float("inf")
    x = torch.tensor([[-inf, -inf, -inf], [0.0, -inf, 1.0], [2.0, 3.0, 4.0]])
    test_close(logsumexp(x), torch.logsumexp(x, dim=-1))
    assert logsumexp(x)[0].item() == -inf
    test_close(log_softmax(x), F.log_softmax(x, dim=-1), equal_nan=True)  # the -inf row is nan in both


def test_cross_entropy_is_nll_of_log_softmax_and_matches_pytorch(data):
    """The notebook's four checks on an untrained model's predictions: nll(log_softmax(pred)) equals
    F.nll_loss(F.log_softmax(pred)) and F.cross_entropy(pred), and logsumexp equals pred.logsumexp(-1).
    Gradients too: autograd through our pieces gives PyTorch's gradient of cross-entropy."""
    x_train, y_train, _, _ = data
    model = AttributeModel(784, NH, 10).double()
    pred = model(x_train[:512].double()).detach()
    y = y_train[:512]
    loss = nll(log_softmax(pred), y)
    test_close(loss, F.nll_loss(F.log_softmax(pred, -1), y))
    test_close(cross_entropy(pred, y), F.cross_entropy(pred, y))
    test_close(logsumexp(pred), pred.logsumexp(-1))
    ours_p, theirs_p = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    cross_entropy(ours_p, y).backward()
    F.cross_entropy(theirs_p, y).backward()
    test_close(ours_p.grad, theirs_p.grad)


@pytest.mark.parametrize("case", list(EXTREME_LOGITS))
def test_cross_entropy_matches_pytorch_on_extreme_logits(case):
    """Cross-entropy inherits log_softmax's stability: on logits of size 1e4 its value and gradient
    equal F.cross_entropy's in float32 (a wrong class with a margin of 1e4 costs a loss of ~1e4)."""
    x = torch.tensor(EXTREME_LOGITS[case])
    target = torch.arange(len(x)) % x.shape[1]
    ours_x, theirs_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = cross_entropy(ours_x, target), F.cross_entropy(theirs_x, target)
    test_near(ours, theirs)
    ours.backward()
    theirs.backward()
    test_near(ours_x.grad, theirs_x.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_loss_functions_return_the_inputs_dtype(dtype):
    """A loss computed in float64 stays float64 (and so on): nothing is silently cast."""
    x = torch.randn(4, 5).to(dtype)
    y = torch.tensor([0, 1, 2, 4])
    for out in (softmax(x), log_softmax(x), logsumexp(x), cross_entropy(x, y), nll(log_softmax(x), y)):
        assert out.dtype == dtype


def test_accuracy_is_the_fraction_of_rows_whose_argmax_is_the_target():
    """accuracy(out, yb) = (argmax(out, 1) == yb).float().mean(): here rows 0 and 2 are right."""
    out = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    yb = torch.tensor([1, 2, 2, 0])
    assert accuracy(out, yb).item() == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------
# The training loop and its refactors.


def test_basic_training_loop_reaches_70_percent_after_one_epoch(data):
    """The notebook's first loop, with the layers in a plain list: one epoch of minibatches (bs 64,
    lr 0.5), each weight and bias updated by hand under no_grad. Valid accuracy is above 0.7."""
    x_train, y_train, x_valid, y_valid = data
    model = PlainListModel(784, NH, 10)
    _train_one_epoch_by_hand(model, model.weights_and_biases, x_train, y_train)
    acc = _valid_accuracy(model, x_valid, y_valid)
    assert acc > 0.7, f"valid accuracy after one epoch {acc:.3f}"


def test_updating_a_parameter_in_place_outside_no_grad_raises():
    """Why the update runs under no_grad: a parameter is a leaf tensor that requires grad, and autograd
    refuses to change one in place while it is tracking it (the change would corrupt the graph that
    computed the gradient). Under no_grad the same update is allowed, and records nothing."""
    w = nn.Parameter(torch.randn(3))
    (w * 2).sum().backward()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        w -= 0.5 * w.grad
    with torch.no_grad():
        w -= 0.5 * w.grad
    assert w.is_leaf and w.grad_fn is None and w.requires_grad


def test_nn_module_registers_layers_set_as_attributes():
    """Setting an nn.Linear as an attribute of an nn.Module registers it: parameters() then yields the
    weights and biases of both layers, so the loop no longer needs to know the layers."""
    model = AttributeModel(784, NH, 10)
    assert [name for name, _ in model.named_children()] == ["l1", "l2"]
    expected = [model.l1.weight, model.l1.bias, model.l2.weight, model.l2.bias]
    assert [id(p) for p in model.parameters()] == [id(p) for p in expected]


def test_dummy_module_registers_public_attributes_through_setattr():
    """What __setattr__ does in DummyModule: every ``self.name = value`` passes through it, and it files
    the value under ``name`` in ``self._modules`` before setting the attribute. parameters() then walks
    that registry; __repr__ shows it."""
    model = DummyModule(784, NH, 10)
    assert list(model._modules) == ["l1", "relu", "l2"]
    assert model._modules["l1"] is model.l1
    expected = [model.l1.weight, model.l1.bias, model.l2.weight, model.l2.bias]
    assert [id(p) for p in model.parameters()] == [id(p) for p in expected]
    assert "l1" in repr(model) and "Linear(in_features=784, out_features=50" in repr(model)
    empty = DummyModule()
    empty.head = nn.Linear(3, 2)
    assert list(empty._modules) == ["head"] and len(list(empty.parameters())) == 2


def test_dummy_module_skips_underscore_names_because_its_registry_is_set_through_setattr_too():
    """Why skip names starting with ``_``: ``self._modules = {}`` itself goes through __setattr__. A
    version without the skip would try to file ``_modules`` into ``self._modules`` before that exists:
    it fails in the constructor (AttributeError). With an nn.Module-style __getattr__ that looks missing
    names up in the registry, the same mistake recurses forever (RecursionError). Private helpers like
    ``_cache`` are also not layers."""

    class NoSkip:
        def __init__(self):
            self._modules = {}

        def __setattr__(self, k, v):
            self._modules[k] = v  # registers everything, including the registry itself
            super().__setattr__(k, v)

    with pytest.raises(AttributeError, match="_modules"):
        NoSkip()

    class NoSkipWithGetattr(NoSkip):
        def __getattr__(self, k):  # only called for missing attributes: _modules is missing at first
            return self._modules[k]

    with pytest.raises(RecursionError):
        NoSkipWithGetattr()

    model = DummyModule()
    model._cache = torch.zeros(3)
    assert "_cache" not in model._modules and "_modules" not in model._modules


MODEL_REFACTORS = {
    "nn.Module attributes": lambda: AttributeModel(784, NH, 10),
    "DummyModule": lambda: DummyModule(784, NH, 10),
    "add_module": lambda: AddModuleModel(_three_layers()),
    "SequentialModel (nn.ModuleList)": lambda: SequentialModel(_three_layers()),
    "nn.Sequential": _sequential,
}


@pytest.mark.parametrize("refactor", list(MODEL_REFACTORS))
def test_each_model_refactor_trains_to_70_percent_in_one_epoch(data, refactor):
    """Each way of registering the layers gives the same loop `for p in model.parameters()` all it needs:
    one epoch trains to valid accuracy > 0.7, as the notebook asserts after every refactor."""
    x_train, y_train, x_valid, y_valid = data
    model = MODEL_REFACTORS[refactor]()
    _train_one_epoch_by_hand(model, model.parameters, x_train, y_train)
    acc = _valid_accuracy(model, x_valid, y_valid)
    assert acc > 0.7, f"{refactor}: valid accuracy after one epoch {acc:.3f}"


def test_refactors_from_the_same_seed_train_to_identical_weights(data):
    """A refactor changes how the code reads, not what it computes: from the same seed, the nn.Module
    model, SequentialModel and nn.Sequential draw the same initial weights and, after the same epoch,
    hold exactly the same weights. (So a better accuracy after a refactor would be a bug, or luck.)"""
    x_train, y_train, _, _ = data
    trained = []
    for make in (lambda: AttributeModel(784, NH, 10), lambda: SequentialModel(_three_layers()), _sequential):
        torch.manual_seed(1)
        model = make()
        _train_one_epoch_by_hand(model, model.parameters, x_train[:2000], y_train[:2000])
        trained.append(list(model.parameters()))
    for other in trained[1:]:
        for p, q in zip(trained[0], other, strict=True):
            assert torch.equal(p, q), f"max diff {(p - q).abs().max().item():.3g}"


def test_sequential_model_registers_its_layers_through_module_list():
    """nn.ModuleList registers a list of layers (a plain list would hide them from parameters())."""
    layers = _three_layers()
    model = SequentialModel(layers)
    assert isinstance(model.layers, nn.ModuleList) and len(list(model.parameters())) == 4
    x = torch.randn(2, 784)
    test_near(model(x), layers[2](layers[1](layers[0](x))))


def test_optimizer_makes_the_same_updates_as_sgd_step_for_step(data):
    """Our Optimizer is SGD: p -= lr * p.grad, then zero the gradients. Two copies of one model, one
    trained by ours and one by optim.SGD on the same 20 batches, hold the same parameters after every step."""
    x_train, y_train, _, _ = data
    ours_model = _sequential()
    theirs_model = copy.deepcopy(ours_model)
    ours_opt, theirs_opt = (
        Optimizer(ours_model.parameters(), lr=LR),
        optim.SGD(theirs_model.parameters(), lr=LR),
    )
    for i in range(0, 20 * BS, BS):
        xb, yb = x_train[i : i + BS], y_train[i : i + BS]
        for model, opt in ((ours_model, ours_opt), (theirs_model, theirs_opt)):
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            opt.zero_grad()
        for p, q in zip(ours_model.parameters(), theirs_model.parameters(), strict=True):
            assert torch.equal(p, q), f"step {i // BS}: max diff {(p - q).abs().max().item():.3g}"


@pytest.mark.parametrize("make_opt", [Optimizer, optim.SGD], ids=["Optimizer", "optim.SGD"])
def test_each_optimizer_refactor_trains_to_70_percent_in_one_epoch(data, make_opt):
    """With an optimizer the loop shrinks to opt.step(); opt.zero_grad(): ours and PyTorch's both train."""
    x_train, y_train, x_valid, y_valid = data
    model = _sequential()
    batches = [(x_train[i : i + BS], y_train[i : i + BS]) for i in range(0, len(x_train), BS)]
    _train_one_epoch(model, make_opt(model.parameters(), lr=LR), batches)
    acc = _valid_accuracy(model, x_valid, y_valid)
    assert acc > 0.7, f"{make_opt.__name__}: valid accuracy after one epoch {acc:.3f}"


def test_backward_adds_to_the_gradients_it_finds():
    """backward() does not overwrite .grad, it ADDS to it: calling it twice doubles the gradient. That
    is why the loop must zero the gradients after each step."""
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    (w * w).sum().backward()
    first = w.grad.clone()
    (w * w).sum().backward()
    test_near(w.grad, 2 * first)


def test_accumulating_k_small_batches_then_stepping_equals_one_big_batch(data):
    """Why PyTorch does not zero gradients for you: accumulation. Summing the gradients of 4 batches
    of 16 (each loss divided by 4, since each is a batch mean) and stepping once gives the same gradients
    and the same parameters as one step on the batch of 64 they make up: a large batch in small memory."""
    x_train, y_train, _, _ = data
    xb, yb = x_train[:64].double(), y_train[:64]
    small = _sequential().double()
    big = copy.deepcopy(small)
    small_opt, big_opt = optim.SGD(small.parameters(), lr=LR), optim.SGD(big.parameters(), lr=LR)
    k = 4
    for i in range(0, 64, 64 // k):
        (F.cross_entropy(small(xb[i : i + 16]), yb[i : i + 16]) / k).backward()
    F.cross_entropy(big(xb), yb).backward()
    for p, q in zip(small.parameters(), big.parameters(), strict=True):
        test_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    small_opt.step()
    big_opt.step()
    for p, q in zip(small.parameters(), big.parameters(), strict=True):
        test_close(p, q, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# Data: Dataset, Sampler, collate, DataLoader.


def test_dataset_gives_x_y_pairs_by_index_and_by_slice(data):
    """Dataset(x, y) pairs inputs with targets: ds[i] is one (x, y), ds[i:j] a batch of them."""
    x_train, y_train, _, _ = data
    ds = Dataset(x_train, y_train)
    assert len(ds) == 8000
    xb, yb = ds[0:5]
    assert xb.shape == (5, 784) and yb.shape == (5,)
    assert torch.equal(ds[3][0], x_train[3]) and ds[3][1].item() == y_train[3].item()


def test_sampler_yields_every_index_once_with_a_short_last_batch():
    """The notebook's example: 10 items with bs 3 give [0,1,2], [3,4,5], [6,7,8], [9]."""
    batches = [b.tolist() for b in Sampler(list(range(10)), 3)]
    assert batches == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert len(Sampler(list(range(10)), 3)) == 4


def test_shuffled_sampler_draws_a_fresh_permutation_each_epoch():
    """With shuffle=True every epoch still visits each index exactly once, in a new random order."""
    sampler = Sampler(list(range(100)), 16, shuffle=True)
    epoch1, epoch2 = (torch.cat(list(sampler)).tolist() for _ in range(2))
    assert sorted(epoch1) == sorted(epoch2) == list(range(100))
    assert epoch1 != epoch2 and epoch1 != list(range(100))


def test_collate_stacks_a_list_of_pairs_into_one_batch(data):
    """collate([(x0, y0), (x1, y1), ...]) -> (stack of xs, stack of ys): what the loader does per batch."""
    x_train, y_train, _, _ = data
    ds = Dataset(x_train, y_train)
    xb, yb = collate([ds[i] for i in (4, 1, 7)])
    assert torch.equal(xb, x_train[[4, 1, 7]]) and torch.equal(yb, y_train[[4, 1, 7]])


def test_our_dataloader_equals_pytorchs_without_shuffle_batch_by_batch(data):
    """Our DataLoader(ds, Sampler(ds, bs), collate) and torch.utils.data.DataLoader(ds, bs) give the same
    batches, in the same order, including the short last one (8000 = 62 * 128 + 64)."""
    x_train, y_train, _, _ = data
    ds = Dataset(x_train, y_train)
    ours = DataLoader(ds, Sampler(ds, 128), collate)
    theirs = TorchDataLoader(ds, batch_size=128)
    assert len(ours) == len(theirs) == 63
    for i, ((xa, ya), (xb, yb)) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb), f"batch {i} differs"


DATA_REFACTORS = {
    "Dataset slices": lambda ds: (ds[i : i + BS] for i in range(0, len(ds), BS)),
    "DataLoader + shuffled Sampler": lambda ds: DataLoader(ds, Sampler(ds, BS, shuffle=True), collate),
    "torch DataLoader, shuffled": lambda ds: TorchDataLoader(ds, batch_size=BS, shuffle=True),
}


@pytest.mark.parametrize("refactor", list(DATA_REFACTORS))
def test_each_data_refactor_trains_to_70_percent_in_one_epoch(data, refactor):
    """Feeding the batches through Dataset, then our DataLoader with a shuffled Sampler, then PyTorch's
    DataLoader: each still trains to valid accuracy > 0.7 in one epoch."""
    x_train, y_train, x_valid, y_valid = data
    model = _sequential()
    _train_one_epoch(
        model, optim.SGD(model.parameters(), lr=LR), DATA_REFACTORS[refactor](Dataset(x_train, y_train))
    )
    acc = _valid_accuracy(model, x_valid, y_valid)
    assert acc > 0.7, f"{refactor}: valid accuracy after one epoch {acc:.3f}"


def test_get_dls_shuffles_training_and_doubles_the_validation_batch(data):
    """get_dls(train_ds, valid_ds, bs): training shuffled with bs, validation in order with 2 * bs."""
    x_train, y_train, x_valid, y_valid = data
    train_dl, valid_dl = get_dls(Dataset(x_train, y_train), Dataset(x_valid, y_valid), BS)
    assert train_dl.batch_size == BS and isinstance(train_dl.sampler, RandomSampler)
    assert valid_dl.batch_size == 2 * BS and isinstance(valid_dl.sampler, SequentialSampler)
    xb, _ = next(iter(valid_dl))
    assert torch.equal(xb, x_valid[: 2 * BS])


def _bytes_saved_for_backward(model: nn.Module, xb: torch.Tensor) -> int:
    """How many bytes of tensors autograd keeps from a forward pass to use in the backward pass."""
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(xb)
    return saved[0]


def test_validation_keeps_no_activations_so_its_batch_can_be_twice_as_large(data):
    """Why the validation batch is twice as large: training keeps every layer's activations for the
    backward pass, and they grow with the batch; validation runs under no_grad, keeps nothing and needs
    memory only for the layer it is computing, so a batch of 2 * bs costs less than training's bs."""
    x_train, _, _, _ = data
    model = _sequential()
    train_64 = _bytes_saved_for_backward(model, x_train[:64])
    train_128 = _bytes_saved_for_backward(model, x_train[:128])
    with torch.no_grad():
        valid_128 = _bytes_saved_for_backward(model, x_train[:128])
    assert train_128 > 1.5 * train_64 > 0, f"saved bytes: bs 64 {train_64}, bs 128 {train_128}"
    assert valid_128 == 0, f"validation kept {valid_128} bytes for a backward pass it never runs"


def test_databunch_holds_both_loaders_and_their_datasets(data):
    """DataBunch(train_dl, valid_dl, c) is what lesson 04's Learner holds: loaders, datasets, classes."""
    x_train, y_train, x_valid, y_valid = data
    train_ds, valid_ds = Dataset(x_train, y_train), Dataset(x_valid, y_valid)
    bunch = DataBunch(*get_dls(train_ds, valid_ds, BS), c=10)
    assert bunch.train_ds is train_ds and bunch.valid_ds is valid_ds and bunch.c == 10
    ours = DataBunch(
        DataLoader(train_ds, Sampler(train_ds, BS)), DataLoader(valid_ds, Sampler(valid_ds, 2 * BS))
    )
    assert ours.train_ds is train_ds and ours.c is None


# ---------------------------------------------------------------------------------------------------
# Validation: train/eval, no_grad, averaging, fit.


def test_train_and_eval_switch_dropout_between_random_and_deterministic():
    """Why model.train() / model.eval() must be called: some layers behave differently. In training
    mode dropout zeroes a random half of the activations, so two calls on the same input differ; in
    eval mode it is the identity, so the outputs are repeatable and equal to the net without dropout."""
    model = nn.Sequential(nn.Linear(784, NH), nn.ReLU(), nn.Dropout(0.5), nn.Linear(NH, 10))
    x = torch.rand(32, 784)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    test_near(model(x), model[3](model[1](model[0](x))))


class _Spy(nn.Module):
    """Records, at each call, whether the model is in training mode and whether autograd is on."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[bool, bool, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled(), len(x)))
        return x


def test_fit_trains_in_train_mode_and_validates_in_eval_mode_without_gradients(data):
    """fit calls model.train() before the training batches and model.eval() before validating, and
    validates under no_grad (no graph, no backward): exactly the notebook's fit."""
    x_train, y_train, x_valid, y_valid = data
    spy = _Spy()
    model = nn.Sequential(nn.Linear(784, 10), spy)
    train_dl = [(x_train[:64], y_train[:64]), (x_train[64:128], y_train[64:128])]
    valid_dl = [(x_valid[:128], y_valid[:128])]
    history = fit(1, model, F.cross_entropy, optim.SGD(model.parameters(), lr=LR), train_dl, valid_dl)
    assert spy.calls == [(True, True, 64), (True, True, 64), (False, False, 128)]
    assert len(history) == 1 and all(isinstance(v, float) for v in history[0])


@pytest.fixture(scope="module")
def trained(data):
    """A model fitted for 3 epochs with get_dls (bs 64, lr 0.5, nh 50) from seed 42, and fit's history."""
    x_train, y_train, x_valid, y_valid = data
    torch.manual_seed(42)
    train_dl, valid_dl = get_dls(Dataset(x_train, y_train), Dataset(x_valid, y_valid), BS)
    model = _sequential()
    history = fit(3, model, F.cross_entropy, optim.SGD(model.parameters(), lr=LR), train_dl, valid_dl)
    return model, history


@pytest.mark.slow
def test_fit_reaches_90_percent_valid_accuracy_in_a_few_epochs(trained):
    """The notebook's fit (with PyTorch's DataLoaders from get_dls) asserts acc > 0.9; on the 8,000-image
    sample three epochs get there (the notebook's full-MNIST run: 0.953, 0.868, 0.961, ...). fit returns
    one (valid_loss, valid_acc) pair of floats per epoch."""
    _, history = trained
    assert len(history) == 3 and all(isinstance(v, float) for pair in history for v in pair)
    loss, acc = history[-1]
    assert acc > 0.9, f"valid accuracy per epoch: {[round(a, 3) for _, a in history]}"
    assert loss < 0.4, f"valid loss per epoch: {[round(l, 3) for l, _ in history]}"


@pytest.mark.slow
def test_validation_average_must_weight_each_batch_by_its_size(data, trained):
    """Are validation results correct if batch sizes vary? Only if weighted. With a batch of 1000 images
    and a batch of 1 (the worst-predicted image), fit's loss and accuracy equal those of all 1001 at once;
    the notebook's plain mean of the two batch means would give the single image half the weight."""
    _, _, x_valid, y_valid = data
    model, _ = trained
    with torch.no_grad():
        losses = F.cross_entropy(model(x_valid), y_valid, reduction="none")
    worst = int(losses.argmax())
    xs = torch.cat([x_valid[:1000], x_valid[worst : worst + 1]])
    ys = torch.cat([y_valid[:1000], y_valid[worst : worst + 1]])
    valid_dl = [(xs[:1000], ys[:1000]), (xs[1000:], ys[1000:])]
    opt = optim.SGD(model.parameters(), lr=LR)
    [(loss, acc)] = fit(1, model, F.cross_entropy, opt, [], valid_dl)  # no training batches: validate only
    with torch.no_grad():
        pred = model(xs)
        whole_loss, whole_acc = F.cross_entropy(pred, ys).item(), accuracy(pred, ys).item()
        mean_of_means = (F.cross_entropy(model(xs[:1000]), ys[:1000]).item() + losses[worst].item()) / 2
    assert loss == pytest.approx(whole_loss, rel=1e-5) and acc == pytest.approx(whole_acc, rel=1e-6)
    assert mean_of_means > 2 * whole_loss, f"mean of batch means {mean_of_means:.3f} vs true {whole_loss:.3f}"


@pytest.fixture(scope="module")
def fresh_runs(data):
    """Two fresh one-epoch runs from the same seed: (model, history) each."""
    x_train, y_train, x_valid, y_valid = data
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        train_dl, valid_dl = get_dls(Dataset(x_train, y_train), Dataset(x_valid, y_valid), BS)
        model = _sequential()
        history = fit(1, model, F.cross_entropy, Optimizer(model.parameters(), lr=LR), train_dl, valid_dl)
        runs.append((model, history, train_dl, valid_dl))
    return runs


def test_fresh_runs_from_the_same_seed_give_identical_results(fresh_runs):
    """Reproducibility: the seed fixes the initial weights and the shuffling, so two fresh runs of the
    same code give the same weights and the same validation numbers, to the last bit. A difference
    between two runs is then a difference of method, not of luck."""
    (model_a, history_a, *_), (model_b, history_b, *_) = fresh_runs
    assert history_a == history_b
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True))


@pytest.mark.slow
def test_rerunning_fit_on_an_already_trained_model_gives_a_better_loss_that_is_not_the_methods(fresh_runs):
    """Is my loss better because of my method, or because I re-ran the cell? Re-running the same
    one-epoch fit on the model the first run left behind reports a lower loss: it has now trained for two
    epochs. A fresh, seeded model running the same cell gives the first run's numbers back exactly."""
    (model, history, train_dl, valid_dl), (_, fresh_history, *_) = fresh_runs
    model = copy.deepcopy(model)
    [(rerun_loss, _)] = fit(
        1, model, F.cross_entropy, Optimizer(model.parameters(), lr=LR), train_dl, valid_dl
    )
    [(first_loss, _)] = history
    assert rerun_loss < first_loss, f"re-run {rerun_loss:.4f} vs first run {first_loss:.4f}"
    assert fresh_history == history
