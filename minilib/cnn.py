"""Lesson 10 (06_cuda_cnn_hooks_init, and 07_batchnorm's layers): a CNN for MNIST, built to be looked into.

The notebook normalises the data with the training set's statistics (``normalize_to``), reshapes each
batch of 784 pixels into ``[N, 1, 28, 28]`` images (first with a ``Lambda`` layer, then with a
``BatchTransformXCallback``), and stacks stride-2 convolutions (kernel 5, then 3) into a small CNN that
ends in an average pool and a linear layer. ``CudaCallback`` moves the model and the batches to the GPU;
everything here also trains on the CPU. Then it makes the layers trainable at high learning rates:
``GeneralRelu`` (leaky, shifted down by ``sub``, clamped at ``maxv``) and ``init_cnn`` (Kaiming with
``a=0.1``); 07 adds a norm after each activation (``conv_layer``).

Where minilib departs from the notebook:
- ``GeneralRelu`` subtracts ``sub`` and clamps out of place. The notebook's in-place ``x.sub_`` after
  ``F.relu`` modifies the output that ReLU saved for its backward, which torch 2 refuses.
- ``CudaCallback(device)`` takes the device (the notebook's first version used a global one) and fails at
  ``begin_fit`` with a RuntimeError where there is no CUDA, instead of deep inside ``.cuda()``.
- ``conv_layer(..., norm=...)`` takes the norm class (07's ``conv_ln``/``conv_in`` are copies of it with
  another norm); ``init_cnn`` reaches every ``nn.Conv2d`` at any depth (07's ``init_cnn_``, not 06's
  loop over the top-level ``nn.Sequential``s).
- ``get_cnn_layers`` defaults ``layer`` to ``conv2d``, 06's first model; ``get_runner`` accepts Callback
  instances in ``cbs`` as well as the notebook's classes and factories.
"""

from __future__ import annotations

import inspect
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn, optim

from minilib import contract
from minilib.data import normalize
from minilib.learner import Callback, Learner, Runner, listify

__all__ = [
    "normalize_to",
    "Lambda",
    "flatten",
    "mnist_resize",
    "view_tfm",
    "mnist_view",
    "CudaCallback",
    "BatchTransformXCallback",
    "conv2d",
    "GeneralRelu",
    "conv_layer",
    "init_cnn",
    "get_cnn_layers",
    "get_cnn_model",
    "get_runner",
    "get_learn_run",
]


def normalize_to(train: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets normalised with the TRAINING set's mean and std: the validation set sees the same map."""
    contract.float_tensor("normalize_to", train=train, valid=valid)
    m, s = train.mean(), train.std()
    return normalize(train, m, s), normalize(valid, m, s)


class Lambda(nn.Module):
    """A layer that calls ``func``: puts a plain function (``flatten``, ``mnist_resize``) in a model."""

    def __init__(self, func):
        super().__init__()
        if not callable(func):
            contract.fail("Lambda", "func", "a callable", func, TypeError)
        self.func = func

    def forward(self, x):
        return self.func(x)

    # No extra_repr: the notebook's printed model shows ``Lambda()``, and get_cnn_model prints the same.


def flatten(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, 1, 1]`` (after the average pool) -> ``[N, C]``: one row per image."""
    return x.view(x.shape[0], -1)


def mnist_resize(x: torch.Tensor) -> torch.Tensor:
    """``[N, 784]`` -> ``[N, 1, 28, 28]``: one channel of 28 x 28 pixels, as a convolution wants."""
    return x.view(-1, 1, 28, 28)


def view_tfm(*size: int):
    """A batch transform viewing each batch as ``[-1, *size]``: ``view_tfm(1, 28, 28)`` is ``mnist_view``."""
    contract.positive_int("view_tfm", **{f"size[{i}]": s for i, s in enumerate(size)})

    def _inner(x):
        return x.view(-1, *size)

    _inner.__name__ = f"view_tfm{size}"
    return _inner


mnist_view = view_tfm(1, 28, 28)


class CudaCallback(Callback):
    """Moves the model to ``device`` when the fit begins, and every batch as it begins.

    ``device``: ``"cuda"``, ``"cuda:1"``, an index (CUDA device n, as ``torch.device(n)``), ``"cpu"``...
    The optimizer keeps working: ``Module.to`` moves the parameters in place. Asked for CUDA where there
    is none, it says so at ``begin_fit``, before a single batch (not inside ``.cuda()`` mid-way).
    """

    def __init__(self, device="cuda"):
        if isinstance(device, int) and not isinstance(device, bool):
            device = torch.device("cuda", device)  # an index means a CUDA device: checked at begin_fit
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as e:  # torch's own message does not say which argument
            error = TypeError if isinstance(e, TypeError) else ValueError
            want = "a device such as 'cuda', 'cuda:1' or 'cpu'"
            contract.fail("CudaCallback", "device", want, contract.describe(device), error)

    def begin_fit(self):
        if self.device.type == "cuda":
            index = self.device.index or 0
            if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                raise RuntimeError(
                    f"CudaCallback: device {self.device} was asked for, but this machine has "
                    f"{torch.cuda.device_count()} CUDA device(s) (torch.cuda.is_available() is "
                    f"{torch.cuda.is_available()}); pass device='cpu' or leave the callback out"
                )
        self.model.to(self.device)

    def begin_batch(self):
        self.run.xb, self.run.yb = self.xb.to(self.device), self.yb.to(self.device)

    def __repr__(self) -> str:
        return f"CudaCallback({str(self.device)!r})"


class BatchTransformXCallback(Callback):
    """``run.xb = tfm(run.xb)`` before each batch (``_order`` 2: after the batch reached its device)."""

    _order = 2

    def __init__(self, tfm):
        if not callable(tfm):
            contract.fail("BatchTransformXCallback", "tfm", "a callable xb -> xb", tfm, TypeError)
        self.tfm = tfm

    def begin_batch(self):
        self.run.xb = self.tfm(self.xb)


def conv2d(ni: int, nf: int, ks: int = 3, stride: int = 2) -> nn.Sequential:
    """06's first layer: ``Conv2d(ni, nf, ks, stride, padding=ks // 2)`` then ``ReLU``."""
    return nn.Sequential(nn.Conv2d(ni, nf, ks, padding=ks // 2, stride=stride), nn.ReLU())


def _optional_number(fname: str, **named) -> None:
    for arg, value in named.items():
        if value is not None:
            contract.finite_number(fname, **{arg: value})


class GeneralRelu(nn.Module):
    """Leaky ReLU (``leak``; plain ReLU when None), minus ``sub``, clamped at ``maxv``.

    ``sub`` moves the mean of the output back towards 0 (a ReLU's output has mean ~0.4 for a unit
    normal input); ``maxv`` stops a few huge activations. Each step is out of place: the notebook's
    ``x.sub_(sub)`` and ``x.clamp_max_(maxv)`` overwrite the output that ``F.relu`` kept for its
    backward, and torch 2 then refuses the backward.
    """

    def __init__(self, leak: float | None = None, sub: float | None = None, maxv: float | None = None):
        super().__init__()
        _optional_number("GeneralRelu", leak=leak, sub=sub, maxv=maxv)
        self.leak, self.sub, self.maxv = leak, sub, maxv

    def forward(self, x):
        x = F.leaky_relu(x, self.leak) if self.leak is not None else F.relu(x)
        if self.sub is not None:
            x = x - self.sub
        if self.maxv is not None:
            x = x.clamp_max(self.maxv)
        return x

    def extra_repr(self) -> str:
        return f"leak={self.leak}, sub={self.sub}, maxv={self.maxv}"


def _is_batch_norm(norm) -> bool:
    """A norm over the batch, per channel: it subtracts each channel's mean, so a conv bias before it
    would be cancelled. PyTorch's ``_BatchNorm`` family, or a class named so (``BatchNorm``,
    ``RunningBatchNorm``, ``FusedBatchNorm2d``)."""
    while isinstance(norm, partial):  # partial(nn.BatchNorm2d, momentum=0.01) is a batch norm too
        norm = norm.func
    cls = norm if isinstance(norm, type) else type(norm)
    return issubclass(cls, nn.modules.batchnorm._BatchNorm) or "BatchNorm" in cls.__name__


def _build_norm(norm, nf: int) -> nn.Module:
    """``norm(nf)``, or ``norm()`` for a class that needs no size (the notebook's ``LayerNorm``)."""
    params = inspect.signature(norm).parameters.values()
    needs_size = any(
        p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params
    )
    return norm(nf) if needs_size else norm()


def conv_layer(
    ni: int, nf: int, ks: int = 3, stride: int = 2, bn: bool = True, norm=nn.BatchNorm2d, **kwargs
):
    """07's layer: ``Conv2d`` (no bias before a batch norm), ``GeneralRelu(**kwargs)``, ``norm`` if ``bn``.

    The norm comes after the activation, as in nb_07. ``norm`` is a class (``nn.BatchNorm2d``, minilib's
    ``BatchNorm``, ``LayerNorm``, ``InstanceNorm``, ``RunningBatchNorm``, ``FusedBatchNorm2d``...) or a
    ``partial`` of one: built as ``norm(nf)``, or ``norm()`` when it takes no size. A batch norm subtracts
    every channel's mean, so the conv's bias would be wasted; the others keep it, as the notebook's
    ``conv_ln``/``conv_in`` do.
    """
    contract.positive_int("conv_layer", ni=ni, nf=nf, ks=ks, stride=stride)
    if bn and not callable(norm):
        contract.fail("conv_layer", "norm", "a norm class such as nn.BatchNorm2d", norm, TypeError)
    with_norm = bool(bn) and norm is not None
    layers = [
        nn.Conv2d(ni, nf, ks, padding=ks // 2, stride=stride, bias=not (with_norm and _is_batch_norm(norm))),
        GeneralRelu(**kwargs),
    ]
    if with_norm:
        layers.append(_build_norm(norm, nf))
    return nn.Sequential(*layers)


def init_cnn(m: nn.Module, uniform: bool = False) -> nn.Module:
    """Kaiming init (``a=0.1``, the leak GeneralRelu uses) and a zero bias for every ``nn.Conv2d`` in
    ``m``, however deep. PyTorch's default (``a=sqrt(5)``, lesson 02a) shrinks every layer's output."""
    if not isinstance(m, nn.Module):
        contract.fail("init_cnn", "m", "an nn.Module", m, TypeError)
    f = nn.init.kaiming_uniform_ if uniform else nn.init.kaiming_normal_
    for layer in m.modules():
        if isinstance(layer, nn.Conv2d):
            f(layer.weight, a=0.1)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return m


def get_cnn_layers(data, nfs, layer=conv2d, **kwargs) -> list[nn.Module]:
    """``layer`` for each step of ``[1] + nfs`` (kernel 5 first, to see more of the image, then 3; stride
    2 each), then ``AdaptiveAvgPool2d(1)``, ``Lambda(flatten)`` and ``Linear(nfs[-1], data.c)``."""
    nfs = list(nfs)
    contract.nonempty("get_cnn_layers", nfs=nfs)
    contract.positive_int("get_cnn_layers", **{"data.c": getattr(data, "c", None)})
    contract.positive_int("get_cnn_layers", **{f"nfs[{i}]": n for i, n in enumerate(nfs)})
    nfs = [1] + nfs
    convs = [layer(nfs[i], nfs[i + 1], 5 if i == 0 else 3, **kwargs) for i in range(len(nfs) - 1)]
    return convs + [nn.AdaptiveAvgPool2d(1), Lambda(flatten), nn.Linear(nfs[-1], data.c)]


def get_cnn_model(data, nfs, layer=conv2d, **kwargs) -> nn.Sequential:
    """``nn.Sequential(*get_cnn_layers(data, nfs, layer, **kwargs))``."""
    return nn.Sequential(*get_cnn_layers(data, nfs, layer, **kwargs))


def get_runner(model, data, lr=0.6, cbs=None, opt_func=None, loss_func=F.cross_entropy):
    """``(Learner, Runner)`` for ``model`` on ``data``: ``opt_func(model.parameters(), lr=lr)`` (SGD by
    default). ``cbs`` are callback classes or factories (the notebook's ``cbfs``), or Callback instances,
    built in the order given (the Runner keeps that order among callbacks of equal ``_order``)."""
    contract.finite_number("get_runner", positive=True, lr=lr)
    opt = (opt_func or optim.SGD)(model.parameters(), lr=lr)
    learn = Learner(model, opt, loss_func, data)
    built = []
    for i, cb in enumerate(listify(cbs)):  # in the order given: the Runner keeps it among equal _orders
        if not (isinstance(cb, Callback) or callable(cb)):
            want = "a Callback class, a factory or a Callback instance"
            contract.fail("get_runner", f"cbs[{i}]", want, cb, TypeError)
        built.append(cb if isinstance(cb, Callback) else cb())
    return learn, Runner(cbs=built)


def get_learn_run(nfs, data, lr, layer=conv_layer, cbs=None, opt_func=None, uniform=False, **kwargs):
    """The notebook's shortcut: ``get_cnn_model(data, nfs, layer, **kwargs)``, ``init_cnn``, then
    ``get_runner``."""
    model = init_cnn(get_cnn_model(data, nfs, layer, **kwargs), uniform=uniform)
    return get_runner(model, data, lr=lr, cbs=cbs, opt_func=opt_func)
