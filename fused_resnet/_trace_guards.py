"""What fx would silently get wrong while convert() traces a model, turned into errors (the module then
counts as untraceable, and convert() works on its children) or into nodes that run at every call.

fx runs the Python of a forward once, on Proxies. Whatever that Python does with something that is not
a Proxy happens once, at trace time, and is frozen into the graph:
- random draws with no tensor argument (Python's `random`, numpy's, `torch.rand(1)`, `torch.bernoulli`
  of a constant): stochastic depth, shake-drop and drop-path written that way would keep one draw;
- grad-mode and autocast context managers (`torch.no_grad()`, `torch.autocast`): fx records no context,
  so the graph would compute gradients or dtypes the original does not;
- in-place arithmetic (`x += y`): a Proxy has no `__iadd__`, so Python falls back to `x = x + y` and the
  graph writes a new tensor where the original wrote into x (seen by every view of it, by the caller who
  passed it). Here it records `operator.iadd` (and the other in-place operators), which runs in place;
- a custom `torch.autograd.Function`: fx runs its forward on the Proxies and loses its backward (a
  straight-through estimator's gradient becomes sign()'s zero; shake-drop's random backward disappears).
  Here its forward, called with Proxies, records one node that calls `Cls.apply` at run time, the class
  found again by its import path.
"""
from __future__ import annotations

import contextlib
import importlib
import operator
import random

import torch
from torch import fx
from torch.overrides import TorchFunctionMode

_RANDOM_TORCH = {
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.bernoulli, torch.normal, torch.poisson,
    torch.multinomial, torch.rand_like, torch.randn_like, torch.randint_like,
    torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.bernoulli_, torch.Tensor.exponential_,
    torch.Tensor.random_, torch.Tensor.geometric_, torch.Tensor.cauchy_, torch.Tensor.log_normal_,
    torch.Tensor.bernoulli, torch.Tensor.multinomial,
}
_RANDOM_PY = ("random", "uniform", "randint", "randrange", "choice", "choices", "sample", "shuffle", "gauss",
              "normalvariate", "betavariate", "expovariate", "getrandbits", "triangular")
_RANDOM_NP = ("rand", "randn", "random", "random_sample", "uniform", "randint", "binomial", "choice", "beta",
              "normal", "shuffle", "permutation")
_CONTEXTS = (torch.no_grad, torch.enable_grad, torch.set_grad_enabled, torch.inference_mode, torch.autocast)


class FrozenAtTrace(fx.proxy.TraceError):
    """Something in a forward that a traced graph would run once, at trace time, instead of every call."""


def _has_proxy(tree) -> bool:
    leaves = torch.utils._pytree.tree_leaves(tree)
    return any(isinstance(leaf, fx.Proxy) for leaf in leaves)


class _RandomGuard(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RANDOM_TORCH and not _has_proxy((args, kwargs)):
            raise FrozenAtTrace(f"{getattr(func, '__name__', func)}() draws random numbers from no traced tensor: "
                                "a graph would keep one draw")
        return func(*args, **kwargs)


def _refuse(what):
    def refuse(*args, **kwargs):
        raise FrozenAtTrace(f"{what} in forward: a traced graph would run it once, at trace time")
    return refuse


_FUNCTIONS: dict = {}  # path -> class, filled when a node is made (torch.compile then reads a dict, not importlib)


def _function_class(path: str):
    cls = _FUNCTIONS.get(path)
    if cls is None:  # a graph unpickled in a new process
        module, qual = path.split(":")
        cls = importlib.import_module(module)
        for part in qual.split("."):
            cls = getattr(cls, part)
        _FUNCTIONS[path] = cls
    return cls


def autograd_function_apply(path: str, *args, **kwargs):
    """Cls.apply(*args) for the torch.autograd.Function at `path` ("module:Qual.Name")."""
    return _function_class(path).apply(*args, **kwargs)


def _functions():
    """Every torch.autograd.Function subclass with a forward of its own (the custom ones, and torch's)."""
    seen, todo = [], [torch.autograd.Function]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in seen:
                seen.append(sub)
                todo.append(sub)
    return [c for c in seen if "forward" in c.__dict__]


def _setup_context_defined(cls) -> bool:
    """A Function with a separate setup_context: its forward takes no ctx."""
    return cls.setup_context is not torch.autograd.Function.setup_context


@contextlib.contextmanager
def guarded(tracer: fx.Tracer):
    """While tracing with `tracer`: the refusals and the autograd.Function node described above."""
    saved, added = [], []

    def patch(obj, name, value):
        saved.append((obj, name, obj.__dict__[name] if isinstance(obj, type) else getattr(obj, name)))
        setattr(obj, name, value)

    def recorded(cls, forward, has_ctx):
        def traced_forward(*args, **kwargs):
            inputs = args[1:] if has_ctx else args
            if not _has_proxy((inputs, kwargs)):
                return forward(*args, **kwargs)
            if "<locals>" in cls.__qualname__:
                raise FrozenAtTrace(f"autograd Function {cls.__qualname__} is defined inside a function: a traced "
                                    "graph could not name it")
            path = f"{cls.__module__}:{cls.__qualname__}"
            _FUNCTIONS[path] = cls
            return tracer.create_proxy("call_function", autograd_function_apply, (path, *inputs), kwargs)
        return traced_forward

    try:
        # Every autograd.Function's forward, not its apply: `self.f = Cls.apply` bound in __init__ (as
        # pytorchcv's shake-drop units do) keeps the apply it was bound with; the C++ apply then calls
        # Cls.forward with Proxies, which records the node instead of tracing into forward.
        for cls in _functions():
            forward = cls.__dict__["forward"]
            fn = forward.__func__ if isinstance(forward, staticmethod) else forward
            patch(cls, "forward", staticmethod(recorded(cls, fn, not _setup_context_defined(cls))))
        for name in _RANDOM_PY:
            patch(random, name, _refuse(f"random.{name}()"))
        with contextlib.suppress(ImportError):
            import numpy.random
            for name in _RANDOM_NP:
                if hasattr(numpy.random, name):
                    patch(numpy.random, name, _refuse(f"numpy.random.{name}()"))
        for ctx in _CONTEXTS:
            patch(ctx, "__enter__", _refuse(f"a {ctx.__name__} context"))
        added = []
        for name in _INPLACE:
            if name not in fx.Proxy.__dict__:
                setattr(fx.Proxy, name, _inplace(getattr(operator, name.strip("_"))))
                added.append(name)
        with _RandomGuard():
            yield
    finally:
        for name in added:
            delattr(fx.Proxy, name)
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


_INPLACE = ("__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
            "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__")


def _inplace(op):
    def record(self, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    return record
