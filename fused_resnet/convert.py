"""convert(): fuse every BN -> ReLU -> conv chain in any model that it can prove safe.

Found with torch.fx. A chain starts at a batch norm that provably computes plain batch norm:
- a module whose forward *is* BatchNorm's own (nn.BatchNorm2d, nn.SyncBatchNorm, our SyncBatchNorm2d),
  or timm's BatchNormAct2d (BatchNorm's forward copied, then its `drop` and `act`: fused when those are
  Identity / ReLU);
- a BatchNorm subclass with a forward of its own is never fused on the strength of its class: fx traces
  into that forward, where `super().forward(x)` is recorded as a call of BatchNorm's own forward on the
  module (`_batch_norm_module`) and anything else it does (a scale, a shift, an activation) stays as
  graph nodes that must themselves fit the chain; a forward fx cannot trace leaves the module alone;
- a functional `F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)`, with
  whatever tensors the graph passes it.
Then a ReLU (nn.ReLU, F.relu, torch.relu, in place or not, a `.relu()` method), and the ReLU output's
users, which must all be convolutions: nn.Conv2d modules or `F.conv2d` / `torch.conv2d` calls with the
weight (and bias) the graph computes (masked, binarized or standardized weights). nn.Identity
placeholders in between (timm's drop_block, aa) do not break a chain.

What a conversion must never do: change what the model computes in either mode, its state_dict keys,
parameter names or module paths, or touch the model it was given (inplace=False). So:
- the rewritten graph calls module-level functions (`_fused_bn_act_conv`, `_fused_bn_act_conv_pair`)
  that take the model's own BN and conv modules (or the graph's tensors); no module is added, moved or
  removed, and the converted module keeps the original's children, parameters and buffers under their
  names, a module registered under several names included;
- those functions fall back to the eager composition, op for op, where the fused op cannot take the
  inputs (not 4-D, a residual that broadcasts), so a converted model runs wherever the original runs;
- BatchNorm modules and mode-dependent modules with no BatchNorm inside (drop-path, drop-block) are fx
  leaves, every buffer is restored after tracing, and a module is traced in both modes: if its forward
  differs between train() and eval(), both traces are fused and a ByMode module runs the one of the
  current mode; if the chains differ between the modes, or fx cannot trace a module, its children are
  converted one by one.
The report names every BatchNorm of the model once: fused (with which conv) or skipped (why, in words).
"""
from __future__ import annotations

import copy
import functools
import inspect
import logging
import operator
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._trace_guards import autograd_function_apply, guarded
from ._validate import output_size
from .functional import BN_KEYWORDS, bn_add_relu, bn_relu_conv2d_pair_with_stats, bn_relu_conv2d_with_stats
from .nn import FusedBNReLUConv2d, FusedBNReLUConv2dPair, PreActBlock, _bn_arguments
from .nn_postact import PostActBlock
from .sync_bn import SyncBatchNorm2d

log = logging.getLogger("fused_resnet.convert")

_RELUS_F = (F.relu, torch.relu, torch.relu_, F.relu_)
_BN = nn.modules.batchnorm._BatchNorm
_ADDS = (operator.add, operator.iadd, torch.add)
_CONVS_F = (F.conv2d, torch.conv2d)
_BN_FORWARD = _BN.forward  # BatchNorm's own forward, saved before tracing patches the class
# Forwards whose semantics the fused op implements exactly: BatchNorm's own, and the synchronized ones.
_PLAIN_BN_FORWARDS = (_BN_FORWARD, nn.SyncBatchNorm.forward, SyncBatchNorm2d.forward)
_CONV_SIG = inspect.signature(lambda input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1: None)
_BN_SIG = inspect.signature(lambda input, running_mean, running_var, weight=None, bias=None, training=False,
                            momentum=0.1, eps=1e-5: None)


@dataclass
class Entry:
    where: str
    fused: bool
    why: str

    def __str__(self):
        return f"{'fused  ' if self.fused else 'skipped'}  {self.where}: {self.why}"


# ----------------------------------------------------------------------------------------------------
# Which batch norms compute plain batch norm


def _timm_norm_act_class(m):
    """timm's BatchNormAct2d among type(m)'s bases, when type(m) keeps its forward; else None."""
    for klass in type(m).__mro__:
        if klass.__name__ == "BatchNormAct2d" and klass.__module__.startswith("timm."):
            return klass if type(m).forward is klass.forward else None
    return None


def _norm_act(m):
    """For timm's BatchNormAct2d: ("relu" | "identity", None) for the activation it applies after the
    batch norm, or (None, why) when it does more than that. (None, None) for any other module."""
    if _timm_norm_act_class(m) is None:
        return None, None
    drop, act = getattr(m, "drop", None), getattr(m, "act", None)
    if drop is not None and not isinstance(drop, nn.Identity):
        return None, f"{type(m).__name__} applies {type(drop).__name__} after the batch norm"
    if act is None or isinstance(act, nn.Identity):
        return "identity", None
    if type(act) is nn.ReLU:
        return "relu", None
    return None, f"{type(m).__name__} applies {type(act).__name__} after the batch norm, not ReLU: only BN -> ReLU is fused"


def _plain_bn(m) -> bool:
    """m computes exactly nn.BatchNorm2d's forward (its own class's code, not a subclass's)."""
    forward = type(m).forward
    forward = _BN_FORWARD if forward is _patched_bn_forward else forward  # while tracing
    return isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) and forward in _PLAIN_BN_FORWARDS


def _hooks(m) -> bool:
    """m has forward hooks or pre-hooks (a fused call never runs the module, so they would not run)."""
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _batch_norm_module(bn, x):
    """BatchNorm's own forward on bn: what `super().forward(x)` runs inside a subclass's forward."""
    return _BN_FORWARD(bn, x)


# ----------------------------------------------------------------------------------------------------
# Tracing


@functools.lru_cache(maxsize=None)
def _reads_training(cls) -> bool:
    """Whether cls.forward's source reads `.training` (its result depends on train()/eval())."""
    try:
        return ".training" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return True  # no source to read: assume it may


class _OpaqueModule(Exception):
    def __init__(self, module, cause):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.module, self.cause = module, cause


class _Tracer(fx.Tracer):
    """Leaves: plain BatchNorms and timm's norm+act (tracing into one runs its buffer updates and
    freezes `training`), our fused modules, mode-dependent modules with no BatchNorm inside (drop-path,
    drop-block, custom dropout), and BatchNorm subclasses whose own forward fx cannot trace (`opaque`).
    Other BatchNorm subclasses are traced into; their `super().forward(x)` becomes one
    `_batch_norm_module(bn, x)` node (see _patched_bn_forward)."""

    def __init__(self, opaque=None):
        # The fused calls stay single nodes when fx traces a converted graph again (unpickling does).
        super().__init__(autowrap_functions=(_fused_bn_act_conv, _fused_bn_act_conv_pair, _fused_bn_add_act, _batch_norm_module,
                                             autograd_function_apply))
        self.opaque = {} if opaque is None else opaque

    def is_leaf_module(self, m, qualname):
        if isinstance(m, (FusedBNReLUConv2d, FusedBNReLUConv2dPair, PreActBlock)) or id(m) in self.opaque \
                or _hooks(m):
            return True  # (fx would drop the hooks of a module it traces through)
        if isinstance(m, _BN):
            return _plain_bn(m) or _timm_norm_act_class(m) is not None or not isinstance(m, nn.BatchNorm2d)
        if (not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) and _reads_training(type(m))
                and not any(isinstance(d, _BN) for d in m.modules())):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        if isinstance(m, _BN) and not self.is_leaf_module(m, ""):
            try:
                return super().call_module(m, forward, args, kwargs)
            except _OpaqueModule:
                raise
            except Exception as e:  # noqa: BLE001 - retried with m as a leaf
                raise _OpaqueModule(m, e) from e
        return super().call_module(m, forward, args, kwargs)


_ACTIVE_TRACERS: list = []


def _patched_bn_forward(self, x):
    """BatchNorm's forward while convert() traces: called on a Proxy (a subclass's `super().forward(x)`),
    it records one `_batch_norm_module(self, x)` node; otherwise it is BatchNorm's own forward."""
    if _ACTIVE_TRACERS and isinstance(x, fx.Proxy):
        tracer = _ACTIVE_TRACERS[-1]
        module = tracer.create_proxy("get_attr", tracer.path_of_module(self), (), {})
        return tracer.create_proxy("call_function", _batch_norm_module, (module, x), {})
    return _BN_FORWARD(self, x)


def _trace(module: nn.Module, opaque: dict) -> fx.Graph:
    """fx graph of module in its current mode, leaving every buffer as it was (a forward that updates
    a buffer, like a counter, runs for real while fx traces it). BatchNorm subclasses whose forward
    cannot be traced are added to `opaque` (id -> why) and the trace retried with them as leaves."""
    saved = {name: b.detach().clone() for name, b in module.named_buffers()}
    try:
        for _ in range(1 + sum(isinstance(m, _BN) for m in module.modules())):
            tracer = _Tracer(opaque)
            _ACTIVE_TRACERS.append(tracer)
            _BN.forward = _patched_bn_forward
            try:
                with guarded(tracer):
                    return tracer.trace(module)
            except _OpaqueModule as e:
                opaque[id(e.module)] = f"{type(e.cause).__name__}: {str(e.cause).splitlines()[0][:100]}"
            finally:
                _BN.forward = _BN_FORWARD
                _ACTIVE_TRACERS.pop()
        raise RuntimeError("tracing did not settle")  # pragma: no cover - each retry adds a leaf
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                if name in saved:
                    b.copy_(saved[name])


def _trace_both_modes(module: nn.Module, opaque: dict):
    """{True: train-mode graph, False: eval-mode graph}; the module's mode is restored."""
    mode = module.training
    try:
        graphs = {}
        for training in (True, False):
            module.train(training)
            graphs[training] = _trace(module, opaque)
    finally:
        module.train(mode)
    return graphs


# ----------------------------------------------------------------------------------------------------
# What the rewritten graph calls


class _Conv(NamedTuple):
    weight: torch.Tensor
    bias: object
    stride: object
    padding: object
    dilation: object
    groups: int
    module: object


def _conv_of(conv) -> _Conv:
    """conv (an nn.Conv2d, or F.conv2d's (weight, bias, stride, padding, dilation, groups)) as one shape."""
    if isinstance(conv, nn.Module):
        return _Conv(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups, conv)
    return _Conv(*conv, None)


def _bn_call(bn, update_running_stats):
    """(the fused op's BN keyword arguments, the num_batches_tracked this call counts or None) for a BN module
    (its forward's semantics) or an F.batch_norm argument tuple (F.batch_norm's). The op counts it once the
    call succeeded (on a kernel backend's eager path, in its finalize launch)."""
    if isinstance(bn, nn.Module):
        return _bn_arguments(bn, update_running_stats, None, False)
    rm, rv, w, b, training, momentum, eps = bn
    keep = update_running_stats or not training  # a second consumer in training must not update them
    return dict(bn_weight=w, bn_bias=b, running_mean=rm if keep else None, running_var=rv if keep else None,
                training=bool(training), momentum=momentum, eps=eps), None


def _fusable_at_run_time(x, bn, convs, residual):
    """Whether the fused op takes these inputs exactly as eager does; otherwise the eager composition
    runs (a converted model runs wherever the original runs)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return False
    if not isinstance(bn, nn.Module):
        rm, rv, _, _, training, momentum, _ = bn
        if isinstance(momentum, torch.Tensor) or momentum is None or (not training and (rm is None or rv is None)):
            return False
    for c in convs:
        if not isinstance(c.weight, torch.Tensor) or c.weight.dim() != 4:
            return False
    if residual is not None:
        c = convs[0]
        if not (isinstance(residual, torch.Tensor) and residual.dtype == x.dtype and residual.dim() == 4
                and residual.device == x.device):
            return False
        padding = (0, 0) if c.padding == "valid" else c.padding
        pad = (padding, padding) if isinstance(padding, int) else padding
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        out = output_size(x.shape[2:], tuple(c.weight.shape[2:]), pair(c.stride), pad, pair(c.dilation))
        if tuple(residual.shape) != (x.shape[0], c.weight.shape[0], *out):
            return False
    return True


def _eager_bn_act(x, bn, activation):
    """The original graph's BN and activation, op for op."""
    if isinstance(bn, nn.Module):
        if _timm_norm_act_class(bn) is not None:
            return bn(x)  # its own activation included
        # A plain BN's own forward (synchronized ones included), or BatchNorm's under a subclass's forward
        a = (type(bn).forward if type(bn).forward in _PLAIN_BN_FORWARDS else _BN_FORWARD)(bn, x)
    else:
        rm, rv, w, b, training, momentum, eps = bn
        a = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    return torch.relu(a) if activation == "relu" else a


def _eager_conv(a, c):
    if c.module is not None:
        return c.module(a)
    return F.conv2d(a, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)


def _fused_bn_act_conv(x, bn, conv, residual=None, *, activation="relu", update_running_stats=True,
                       backend="auto"):
    """conv(act(bn(x))) (+ residual): bn an nn.BatchNorm2d-like module or F.batch_norm's arguments
    (running_mean, running_var, weight, bias, training, momentum, eps); conv an nn.Conv2d or F.conv2d's
    (weight, bias, stride, padding, dilation, groups); activation "relu" or "identity" (for timm's
    norm+act, the one the module applies itself)."""
    c = _conv_of(conv)
    if not _fusable_at_run_time(x, bn, [c], residual):
        y = _eager_conv(_eager_bn_act(x, bn, activation), c)
        return y if residual is None else y + residual
    kw, counted = _bn_call(bn, update_running_stats)
    y, _, _ = bn_relu_conv2d_with_stats(x, c.weight, c.bias, stride=c.stride, padding=c.padding,
                                        dilation=c.dilation, groups=c.groups, residual=residual, backend=backend,
                                        activation=activation, _num_batches_tracked=counted, **kw)
    return y


def _fused_bn_act_conv_pair(x, bn, conv, conv2, *, activation="relu", backend="auto"):
    """(conv(a), conv2(a)) for a = act(bn(x)), one op: the BN's backward runs once on the summed gradient
    and its buffers are updated once, as eager's does. Arguments as _fused_bn_act_conv's."""
    c, c2 = _conv_of(conv), _conv_of(conv2)
    if not _fusable_at_run_time(x, bn, [c, c2], None):
        a = _eager_bn_act(x, bn, activation)
        return _eager_conv(a, c), _eager_conv(a, c2)
    kw, counted = _bn_call(bn, True)
    kw.pop("input_stats", None), kw.pop("out_stats", None)
    y, y2, _, _ = bn_relu_conv2d_pair_with_stats(
        x, c.weight, c2.weight, c.bias, c2.bias, stride=c.stride, padding=c.padding, dilation=c.dilation,
        stride2=c2.stride, padding2=c2.padding, dilation2=c2.dilation, backend=backend, activation=activation,
        _num_batches_tracked=counted, **kw)
    return y, y2


_BN_KEYS = BN_KEYWORDS


def _add_fusable_at_run_time(z, bn, shortcut, shortcut_bn):
    """Whether bn_add_relu takes these inputs exactly as eager's BN, add and ReLU do: 4-D tensors of one
    shape, dtype and device (eager's add would broadcast or promote), BNs without process-group statistics."""
    if not (isinstance(z, torch.Tensor) and isinstance(shortcut, torch.Tensor) and z.dim() == 4
            and shortcut.shape == z.shape and shortcut.dtype == z.dtype and shortcut.device == z.device):
        return False
    for b in (bn, shortcut_bn):
        if b is None:
            continue
        if isinstance(b, nn.Module):
            if b.training and isinstance(b, (nn.SyncBatchNorm, SyncBatchNorm2d)):
                return False
        elif not _fusable_at_run_time(z, b, [], None):
            return False
    return True


def _fused_bn_add_act(z, bn, shortcut, shortcut_bn=None, *, activation="relu", inplace=False, backend="auto"):
    """act(bn(z) + t), t = shortcut or shortcut_bn(shortcut): a post-activation block's end (torchvision's
    `relu(bn3(out) + identity)`) in one op. BNs as _fused_bn_act_conv takes them. inplace: the graph added
    in place into bn(z) (`out += identity`), which keeps bn(z)'s dtype where an add would promote; the
    eager fallback replays that, the BNs in the graph's order."""
    if not _add_fusable_at_run_time(z, bn, shortcut, shortcut_bn):
        y = _eager_bn_act(z, bn, "identity")
        t = _eager_bn_act(shortcut, shortcut_bn, "identity") if shortcut_bn is not None else shortcut
        y = y.add_(t) if inplace else y + t
        return torch.relu(y) if activation == "relu" else y
    kw, counted = _bn_call(bn, True)
    s_kw, s_counted = _bn_call(shortcut_bn, True) if shortcut_bn is not None else (None, None)
    return bn_add_relu(z, shortcut, **{k: kw[k] for k in _BN_KEYS}, backend=backend, activation=activation,
                       shortcut_bn={k: s_kw[k] for k in _BN_KEYS} if s_kw is not None else None,
                       _num_batches_tracked=counted, _shortcut_num_batches_tracked=s_counted)


# ----------------------------------------------------------------------------------------------------
# Finding and rewriting chains


@dataclass
class _Site:
    """One batch-norm call in a graph: its node, input node, and what the fused call takes for it."""
    node: fx.Node
    x: fx.Node
    name: str                 # the module's path, for the report
    bn: object                # the BN module (runtime) or None for F.batch_norm
    bn_arg: object            # what the fused call gets: a get_attr node of the module, or the F.batch_norm tuple
    act_in_module: str | None  # timm's norm+act: the activation it applies itself


def _site(gm, node, prefix):
    """The _Site of node if it is a batch-norm call, (None, None) if not, (None, why) if it is one that
    cannot be fused (the report's reason)."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if not isinstance(m, _BN):
            return None, None
        if not isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            return None, f"{type(m).__name__} is not a 2-d batch norm"
        act, why = _norm_act(m)
        if why:
            return None, why
        if not _plain_bn(m) and act is None:
            return None, (f"{type(m).__name__}.forward is not BatchNorm's own and fx cannot trace into it, so what "
                          "it computes is unknown: left as it is")
        if not node.args or node.kwargs or len(node.args) != 1:
            return None, f"{type(m).__name__} is called with extra arguments"
        return _Site(node, node.args[0], f"{prefix}{node.target}", m, None, act), None
    if node.op == "call_function" and node.target is _batch_norm_module:
        holder, x = node.args
        m = gm.get_submodule(holder.target)
        if not isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            return None, None
        return _Site(node, x, f"{prefix}{holder.target}", m, holder, None), None
    if node.op == "call_function" and node.target is F.batch_norm:
        try:
            b = _BN_SIG.bind(*node.args, **node.kwargs)
        except TypeError:
            return None, None
        b.apply_defaults()
        a = b.arguments
        if any(isinstance(a[k], fx.Node) for k in ("training", "momentum", "eps")):
            return None, ("F.batch_norm() is called with a training flag, momentum or eps computed at run time; "
                          "left as it is")
        # Named by the module whose running_mean (else weight) it reads, as the report names modules
        held = next((t for t in (a["running_mean"], a["weight"]) if isinstance(t, fx.Node) and t.op == "get_attr"),
                    None)
        name = (f"{prefix}{held.target.rsplit('.', 1)[0]}" if held is not None and "." in held.target
                else f"F.batch_norm({prefix}{held.target})" if held is not None
                else f"F.batch_norm() of {_origin(a['input'], prefix)}")
        tup = (a["running_mean"], a["running_var"], a["weight"], a["bias"], a["training"], a["momentum"], a["eps"])
        return _Site(node, a["input"], name, None, tup, None), None
    return None, None


def _origin(node, prefix, steps=4):
    """What a tensor node is made from, for the report: the parameter or buffer it comes from (through a
    few reshapes or other ops on its first argument), else 'a tensor computed in forward'."""
    for _ in range(steps):
        if not isinstance(node, fx.Node):
            break
        if node.op == "get_attr":
            return f"{prefix}{node.target}"
        node = node.args[0] if node.args else None
    return "a tensor computed in forward"


def _skip_identity(gm, node):
    """node's single user, followed through nn.Identity modules; returns (the first non-Identity user
    or None when there is not exactly one user, the Identity nodes passed)."""
    passed = []
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None, passed
        nxt = users[0]
        if nxt.op == "call_module" and isinstance(gm.get_submodule(nxt.target), nn.Identity):
            passed.append(nxt)
            node = nxt
            continue
        return nxt, passed


def _is_relu(gm, node):
    """A plain ReLU call (in place or not; no threshold or other arguments)."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function" and node.target in _RELUS_F:
        return len(node.args) == 1 and set(node.kwargs) <= {"inplace"} or \
            (len(node.args) == 2 and isinstance(node.args[1], bool))
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1 and not node.kwargs


def _conv_user(gm, node, feeds, prefix):
    """(the conv's argument for the fused call, its name, its module or None) when node is a convolution
    reading one of `feeds`; (None, why, None) when it is a conv that cannot be fused; None otherwise."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if not isinstance(m, nn.Conv2d) or len(node.args) != 1 or node.kwargs or node.args[0] not in feeds:
            return None
        return ("module", f"{prefix}{node.target}", m)
    if node.op == "call_function" and node.target in _CONVS_F:
        try:
            b = _CONV_SIG.bind(*node.args, **node.kwargs)
        except TypeError:
            return None
        b.apply_defaults()
        a = b.arguments
        if a["input"] not in feeds:
            return None
        if any(isinstance(a[k], fx.Node) for k in ("stride", "padding", "dilation", "groups")):
            return (None, "conv2d() is called with a stride, padding, dilation or groups computed at run time", None)
        return ((a["weight"], a["bias"], a["stride"], a["padding"], a["dilation"], a["groups"]),
                f"conv2d() of {_describe_value(gm, a['weight'], prefix)}", None)
    return None


def _describe_value(gm, node, prefix):
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return f"{prefix}{node.target}"
    return "a weight computed in forward"


def _residual_add(conv_node):
    """The add node that takes conv_node's output and one other tensor, if that is its only use."""
    if len(conv_node.users) != 1:
        return None, None
    add = next(iter(conv_node.users))
    if add.op != "call_function" or add.target not in _ADDS or add.kwargs or len(add.args) != 2:
        return None, None
    a, b = add.args
    other = b if a is conv_node else a
    if other is conv_node or not isinstance(other, fx.Node):
        return None, None
    if add.target is operator.iadd and a is other:
        return None, None  # `residual += conv(x)` writes into the residual's tensor: the fused op would not
    return add, other


def _describe(gm, node, prefix) -> str:
    """A graph node as a person would name it: the module (and its type), function or method."""
    if node.op == "call_module":
        return f"{prefix}{node.target} ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', str(node.target))}()"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "output":
        return "the model's output"
    return str(node.target)


def _users(gm, nodes, prefix) -> str:
    names = [_describe(gm, u, prefix) for u in nodes]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _unfusable(bn, conv, groups):
    """Why this (BN, conv) pair is left to eager even though it is a BN -> ReLU -> conv chain, or None.
    A converted model must run wherever the original runs and compute the same thing."""
    if conv is not None:
        if type(conv).forward is not nn.Conv2d.forward:
            return (f"{type(conv).__name__} overrides Conv2d.forward and fx cannot trace into it, so the fused op "
                    "(a plain convolution) might not compute what it does: it stays with eager")
        if conv.padding_mode != "zeros":
            return f"only padding_mode='zeros' convolutions can be fused, got {conv.padding_mode!r}"
        if bn is not None and bn.num_features != conv.in_channels:
            return f"the batch norm has {bn.num_features} features but the conv expects {conv.in_channels} channels"
    if groups != 1:
        return (f"the conv has groups={groups}: no fused kernel for grouped convolutions, so it stays with eager "
                "(same result, no speed lost)")
    if bn is not None and bn.eps < 0:
        return f"BatchNorm2d eps={bn.eps} is negative: the fused op refuses it, eager does not"
    return None


def _holder(gm, site, before):
    """The node the fused call takes for the BN: a get_attr of its module, or the F.batch_norm tuple."""
    if site.bn is None or site.bn_arg is not None:
        return site.bn_arg
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(site.node.target)


def _conv_arg(gm, spec, conv_node, before):
    if spec[0] == "module":
        with gm.graph.inserting_before(before):
            return gm.graph.get_attr(conv_node.target)
    return spec[0]


def _fuse_graph(gm: fx.GraphModule, prefix: str, backend: str, report: list) -> int:
    count = 0
    for bn_node in list(gm.graph.nodes):
        if bn_node.graph is not gm.graph or bn_node not in gm.graph.nodes:
            continue
        site, why = _site(gm, bn_node, prefix)
        if site is None:
            if why:
                report.append(Entry(_site_name(gm, bn_node, prefix), False, why))
            continue
        where = site.name
        passed = []
        if site.act_in_module is not None:  # timm's norm+act: the module applies it (or none) itself
            act_node, activation = bn_node, site.act_in_module
        else:
            act_node, passed = _skip_identity(gm, bn_node)
            if act_node is not None and _is_relu(gm, act_node):
                activation = "relu"
            else:  # BN -> conv with no ReLU between (PyramidNet's units), if its users are all convs
                act_node, passed, activation = bn_node, [], "identity"
        # The activation's users, each followed through Identity placeholders.
        users, between = [], []
        for u in list(act_node.users):
            node, ids = u, []
            while node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Identity) \
                    and len(node.users) == 1:
                ids.append(node)
                node = next(iter(node.users))
            users.append(node)
            between += ids
        feeds = set([act_node] + between)
        convs = [(u, _conv_user(gm, u, feeds, prefix)) for u in users]
        bad = [u for u, spec in convs if spec is None]
        if (bad or not convs) and activation == "identity" and site.act_in_module is None:
            post = _post_activation(gm, site, prefix)
            if isinstance(post, str):
                report.append(Entry(where, False, post))
                continue
            if post is not None:
                fused, why = _fuse_post_activation(gm, site, post, backend, report)
                count += fused
                if fused or why:
                    continue
        if bad or not convs:
            also = " besides the conv(s)" if convs and len(bad) < len(convs) else ""
            if activation == "relu":
                why = (f"its ReLU output is needed by {_users(gm, bad, prefix) or 'nothing'}{also}; the fused op "
                       "never materializes relu(bn(x)), so every user must be a convolution")
                if any(u.op == "call_module" and isinstance(gm.get_submodule(u.target), nn.MaxPool2d) for u in bad):
                    why += (" (a ResNet stem's BN -> ReLU -> max-pool: no fused kernel takes the BN and ReLU into a "
                            "pool yet; eager runs it, the same result)")
            else:
                why = (f"its output goes to {_users(gm, bad, prefix) or 'nothing'}{also}; fusion needs it to feed "
                       "one ReLU whose users are all convolutions, convolutions only, or one add (a "
                       "post-activation block's end, BN -> add (-> ReLU))")
            report.append(Entry(where, False, why))
            continue
        hooked = [n for n in [bn_node, act_node, *passed, *between, *(c for c, _ in convs)]
                  if n.op == "call_module" and _hooks(gm.get_submodule(n.target))]
        if hooked:
            report.append(Entry(where, False, f"{_users(gm, hooked, prefix)} has forward hooks, which a fused call "
                                              "would not run"))
            continue
        why = next((spec[1] for _, spec in convs if spec[0] is None), None)
        why = why or next((w for w in (_unfusable(site.bn, spec[2], spec[0][5] if spec[0] != "module" else
                                                  spec[2].groups) for _, spec in convs) if w), None)
        if why:
            report.append(Entry(where, False, why))
            continue
        at = _pair_point(gm, convs) if len(convs) == 2 else None
        if at is not None:
            count += _fuse_pair(gm, site, activation, convs, at, backend, report)
        else:
            count += _fuse_each(gm, site, activation, convs, backend, report)
        # Now unused, users before their inputs: Identity nodes after the activation, the activation, the
        # Identity nodes between BN and activation, the BN.
        for node in reversed(between):
            gm.graph.erase_node(node)
        if act_node is not bn_node:
            gm.graph.erase_node(act_node)
        for node in reversed(passed):
            gm.graph.erase_node(node)
        gm.graph.erase_node(bn_node)
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


class _PostAct(NamedTuple):
    add: fx.Node
    out: fx.Node            # the ReLU after the add, or the add itself (activation "identity")
    activation: str
    shortcut: fx.Node       # the add's other operand
    shortcut_site: object   # its _Site when it is a batch norm used only by the add, else None
    between: list           # Identity nodes passed after the BN and after the add
    inplace: bool           # `out += shortcut` into the BN's output (its dtype kept)


def _post_activation(gm, site, prefix):
    """The BN -> add (-> ReLU) of a post-activation block's end (torchvision's `out = bn3(out); out +=
    identity; out = relu(out)`; PyramidNet's units end without the ReLU), Identity placeholders allowed
    between; None if site is not that; why not, when it is one that cannot be fused."""
    add, passed = _skip_identity(gm, site.node)
    if add is None or add.op != "call_function" or add.target not in _ADDS or add.kwargs or len(add.args) != 2:
        return None
    mine = passed[-1] if passed else site.node
    a, b = add.args
    other = b if a is mine else a
    if other is mine or not isinstance(other, fx.Node):
        return None
    if add.target is operator.iadd and a is other:
        # `shortcut += bn(z)` writes into the shortcut's tensor, which may be seen elsewhere however few graph
        # users it has (a view of another tensor, the caller's input, a buffer); the fused op writes a new one.
        return ("its output is added in place into another tensor (`t += bn(x)`), which the fused op would "
                "leave unchanged: left as it is")
    relu, passed2 = _skip_identity(gm, add)
    out, activation = (relu, "relu") if relu is not None and _is_relu(gm, relu) else (add, "identity")
    if activation == "identity":
        passed2 = []
    other_site = None
    if len(other.users) == 1:
        candidate, _ = _site(gm, other, prefix)
        if candidate is not None and candidate.act_in_module is None:
            if _same_bn(site, candidate):
                # One BN on both sides: eager updates its running statistics (and, with momentum=None, its
                # factor) once per call, in order; one fused op cannot reproduce the second call's factor.
                return None
            other_site = candidate
    return _PostAct(add, out, activation, other, other_site, passed + passed2, add.target is operator.iadd)


def _same_bn(a, b) -> bool:
    if a.bn is not None or b.bn is not None:
        return a.bn is b.bn
    return any(x is y and isinstance(x, fx.Node) for x, y in zip(a.bn_arg[:4], b.bn_arg[:4]))


def _fuse_post_activation(gm, site, post, backend, report):
    """Replace BN (-> its shortcut's BN) -> add -> ReLU with one _fused_bn_add_act call. (fused count, why
    not when it is a post-activation end that cannot be fused, else None)."""
    sites = [site] + ([post.shortcut_site] if post.shortcut_site is not None else [])
    nodes = [s.node for s in sites] + [post.add, post.out] + post.between
    hooked = [n for n in nodes if n.op == "call_module" and _hooks(gm.get_submodule(n.target))]
    why = (f"{_users(gm, hooked, '')} has forward hooks, which a fused call would not run" if hooked else
           next((w for w in (_unfusable(s.bn, None, 1) for s in sites) if w), None))
    if why:
        report.append(Entry(site.name, False, f"post-activation BN -> add, not fused: {why}"))
        return 0, why
    at = post.out
    args = [site.x, _holder(gm, site, at)]
    if post.shortcut_site is not None:
        args += [post.shortcut_site.x, _holder(gm, post.shortcut_site, at)]
    else:
        args += [post.shortcut, None]
    with gm.graph.inserting_before(at):
        new = gm.graph.call_function(_fused_bn_add_act, tuple(args),
                                     dict(activation=post.activation, inplace=post.inplace, backend=backend))
    at.replace_all_uses_with(new)
    pending = list(dict.fromkeys([post.out, *post.between, post.add, *(s.node for s in sites)]))
    while pending:  # users before what they use
        gone = [n for n in pending if not n.users]
        for n in gone:
            gm.graph.erase_node(n)
        pending = [n for n in pending if n not in gone]
        assert gone, "a post-activation node still in use after the rewrite"
    ends = "add -> ReLU" if post.activation == "relu" else "add"
    report.append(Entry(f"{site.name} -> {ends}", True, "post-activation block end, one pass" + (
        f" with the shortcut's BN {post.shortcut_site.name}" if post.shortcut_site is not None else
        " (identity shortcut)")))
    if post.shortcut_site is not None:
        report.append(Entry(f"{post.shortcut_site.name} -> {ends}", True,
                            f"the shortcut's BN, in {site.name}'s fused block end"))
    return 1 + (post.shortcut_site is not None), None


def _site_name(gm, node, prefix):
    if node.op == "call_module":
        return f"{prefix}{node.target}"
    return _describe(gm, node, prefix)


def _fuse_each(gm, site, activation, convs, backend, report) -> int:
    for i, (conv_node, spec) in enumerate(convs):
        add, other = _residual_add(conv_node)
        at = add if add is not None else conv_node  # every input of the fused call is defined by then
        bn_arg = _holder(gm, site, at)
        conv_arg = _conv_arg(gm, spec, conv_node, at)
        kwargs = dict(activation=activation, update_running_stats=i == 0, backend=backend)
        with gm.graph.inserting_before(at):
            new = gm.graph.call_function(_fused_bn_act_conv,
                                         (site.x, bn_arg, conv_arg, other if add is not None else None), kwargs)
        at.replace_all_uses_with(new)
        gm.graph.erase_node(at)
        if add is not None:
            gm.graph.erase_node(conv_node)
        how = "with the residual add in the epilogue" if add is not None else "no residual"
        shared = f", shares the BN with {len(convs) - 1} other conv(s)" if len(convs) > 1 else ""
        report.append(Entry(f"{site.name} -> {spec[1]}", True, how + shared))
    return len(convs)


def _pair_point(gm, convs):
    """Where one call can replace both convs: before the first of them, when the other's weight and bias
    are computed by then (they always are for conv modules); else None."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    at = min((c for c, _ in convs), key=order.__getitem__)
    for _, spec in convs:
        if spec[0] != "module" and any(isinstance(t, fx.Node) and order[t] >= order[at] for t in spec[0][:2]):
            return None
    return at


def _fuse_pair(gm, site, activation, convs, at, backend, report) -> int:
    """A BN whose ReLU feeds exactly two convs (a pre-activation block's conv1 and projection shortcut): one
    fused pair call, so the backward runs the BN's once on the summed gradient, as eager does (two
    fused calls would run it twice). The pair has no residual epilogue: an add after one of its convs
    stays in the graph."""
    bn_arg = _holder(gm, site, at)
    args = [_conv_arg(gm, spec, node, at) for node, spec in convs]
    with gm.graph.inserting_before(at):
        call = gm.graph.call_function(_fused_bn_act_conv_pair, (site.x, bn_arg, *args),
                                      dict(activation=activation, backend=backend))
        outs = [gm.graph.call_function(operator.getitem, (call, i)) for i in range(2)]
    for (conv_node, spec), out, (_, other) in zip(convs, outs, reversed(convs)):
        conv_node.replace_all_uses_with(out)
        gm.graph.erase_node(conv_node)
        report.append(Entry(f"{site.name} -> {spec[1]}", True,
                            f"one op with {other[1]} (the BN shared by both: its backward runs once)"))
    return 2


# ----------------------------------------------------------------------------------------------------
# Modules


def _keep_state(new: nn.Module, old: nn.Module):
    """new gets old's children, parameters and buffers, in old's order and under old's names (a module
    registered under several names keeps them all), its plain attributes and its mode flag (not its
    children's: those are shared and keep theirs)."""
    new._modules = OrderedDict(old._modules)
    new._parameters = OrderedDict(old._parameters)
    new._buffers = OrderedDict(old._buffers)
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    for k, v in old.__dict__.items():
        if not k.startswith("_") and k not in new.__dict__ and not callable(v):
            new.__dict__[k] = v
    new.training = old.training


class Converted(nn.Module):
    """What convert() returns for a module it rewrote: the original module's children, parameters,
    buffers and plain attributes under their names (so state_dict keys, named_parameters() and module
    paths are the original's), and the fused fx graph(s) that run it -- one per mode when the forward
    differed between train() and eval() (dropout or another mode-dependent branch that tracing would
    freeze), picked by self.training. The graphs hold the same objects (kept in step by _apply) and are
    not children, so they add no names; deepcopy and pickle keep the sharing."""

    def __init__(self, module: nn.Module, train_graph: fx.GraphModule, eval_graph: fx.GraphModule):
        super().__init__()
        _keep_state(self, module)
        object.__setattr__(self, "_graphs", {True: train_graph, False: eval_graph})
        object.__setattr__(self, "_original_class", type(module).__qualname__)

    def forward(self, *args, **kwargs):
        return self._graphs[self.training](*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        for g in self._graphs.values():  # .to()/.half() replace this module's own buffers: share them again
            g._parameters.update(self._parameters)
            g._buffers.update(self._buffers)
        return out

    def _get_name(self):
        return f"{self._original_class}Fused"

    @property
    def code(self) -> str:
        """The fused forward's Python code (train mode, then eval mode where it differs)."""
        t, e = self._graphs[True], self._graphs[False]
        return t.code if t is e else f"# train()\n{t.code}\n# eval()\n{e.code}"


# Kept for code that named the mode-dependent case.
ByMode = Converted


def _graph_module(module, graph, cls):
    gm = fx.GraphModule(module, graph, class_name=cls)
    _keep_state(gm, module)
    return gm


def _convert_children(module, prefix, backend, report, opaque, why):
    report.append(Entry(prefix.rstrip(".") or "<model>", False, f"{why}; converting its children"))
    for name, child in list(module.named_children()):
        new = _convert_module(child, f"{prefix}{name}.", backend, report, opaque)
        if new is not child:
            setattr(module, name, new)
    return module


def _convert_module(module: nn.Module, prefix: str, backend: str, report: list, opaque: dict) -> nn.Module:
    if isinstance(module, (FusedBNReLUConv2d, FusedBNReLUConv2dPair, PreActBlock, PostActBlock)):
        report.append(Entry(prefix.rstrip(".") or "<model>", False, "already fused"))
        return module
    if isinstance(module, _BN):  # a leaf, or traced into by its parent: nothing to fuse inside it alone
        return module
    if not any(isinstance(m, _BN) for m in module.modules()) and not _calls_batch_norm(module):
        return module
    try:
        graphs = _trace_both_modes(module, opaque)
    except Exception as e:  # fx cannot trace data-dependent control flow; search the children
        why = f"not traceable as a whole ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})"
        return _convert_children(module, prefix, backend, report, opaque, why)
    same = graphs[True].python_code("self").src == graphs[False].python_code("self").src
    cls = type(module).__name__ + "Fused"
    if same:
        gm = _graph_module(module, graphs[module.training], cls)
        if _fuse_graph(gm, prefix, backend, report) == 0:
            return module
        return Converted(module, gm, gm)
    # The forward depends on the mode: fuse both traces (the same chains, the same modules) and pick
    # by mode at run time, so dropout and the like keep following train()/eval().
    fused = {}
    for training in (True, False):
        entries = []
        gm = _graph_module(module, graphs[training], cls)
        fused[training] = (gm, _fuse_graph(gm, prefix, backend, entries), entries)
    (gt, nt, et), (ge, _, ee) = fused[True], fused[False]
    # The same chains in both modes (what is skipped, and why, may differ: dropout in one, a scale in the other)
    if [str(e) for e in et if e.fused] != [str(e) for e in ee if e.fused]:
        return _convert_children(module, prefix, backend, report, opaque,
                                 "its forward differs between train() and eval() in which chains exist")
    report.extend(et)
    if nt == 0:
        return module
    return Converted(module, gt, ge)


def _calls_batch_norm(module) -> bool:
    """A module with no BatchNorm inside may still call F.batch_norm on tensors of its own."""
    return any(_forward_mentions_batch_norm(type(m)) for m in module.modules())


@functools.lru_cache(maxsize=None)
def _forward_mentions_batch_norm(cls) -> bool:
    try:
        return "batch_norm" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _complete(report: list, bns, opaque):
    """One entry for every BatchNorm of the model: those no traced graph reached get one saying where
    they sit (inside a module kept as it is: already fused, or one whose children were searched)."""
    named = {e.where.split(" -> ")[0] for e in report}
    for name, m in bns:
        if name in named:
            continue
        parents = sorted((e for e in report if not e.fused and name.startswith(e.where + ".")),
                         key=lambda e: len(e.where))
        kind = type(m).__name__
        if id(m) in opaque:
            why = (f"{kind}.forward is not BatchNorm's own and fx cannot trace into it ({opaque[id(m)]}), so what "
                   "it computes is unknown: left as it is")
        elif any(e.why == "already fused" for e in parents):
            why = "inside an already fused module"
        elif parents:
            why = f"inside {parents[-1].where}, which is left as it is ({parents[-1].why})"
        else:
            why = (f"{kind} not reached by a traced graph (it is called inside a module that is kept as it "
                   "is), so no chain through it could be seen")
        report.append(Entry(name, False, why))


def fused_calls(model: nn.Module) -> int:
    """How many fused calls a converted model's graphs make (a pair counts once)."""
    graphs = [m._graphs[True].graph for m in model.modules() if isinstance(m, Converted)]
    return sum(n.op == "call_function" and n.target in (_fused_bn_act_conv, _fused_bn_act_conv_pair, _fused_bn_add_act)
               for g in graphs for n in g.nodes)


def convert(model: nn.Module, backend: str = "auto", inplace: bool = False) -> nn.Module:
    """Return a model computing the same function with its safe BN->ReLU->conv chains fused.

    inplace=False works on a deep copy; inplace=True converts the given model's children in place and
    shares its parameters (the returned module is the one to use either way: a traced top level comes
    back as a new fx.GraphModule holding the original's children). State_dict keys, parameter names and
    module paths are the original's. The returned module has `fusion_report`, a list of entries saying
    what was fused and what was skipped and why; the same table is logged at INFO level.
    """
    from .backends import CHOICES

    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() takes an nn.Module, got {type(model).__name__}")
    if backend not in CHOICES:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(CHOICES)}")
    if not inplace:
        model = copy.deepcopy(model)
    report: list = []
    opaque: dict = {}
    bns = [(name, m) for name, m in model.named_modules() if isinstance(m, _BN)]
    out = _convert_module(model, "", backend, report, opaque)
    _complete(report, bns, opaque)
    out.fusion_report = report
    log.info("fused_resnet.convert: %d fused, %d skipped\n%s", sum(e.fused for e in report),
             sum(not e.fused for e in report), "\n".join(str(e) for e in report))
    return out
