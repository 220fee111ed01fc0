"""bn_relu_conv2d: validate, pick a backend, get the BN statistics, run the registered op, update buffers."""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from . import _deferred, _ops, _ops_postact, _plan, _sync, reference
from ._validate import validate, validate_bn, validate_bn_add
from .backends import resolve


_KERNEL_BACKENDS = ("triton", "cuda")  # the backends with a finalize kernel (no ATen tail)


def _detached(t):
    return t.detach() if t is not None else None


def _eager_finalize(kb, x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, input_stats,
                    counter):
    """(the [5, C] bn_finalize of x's BN, whether it counted `counter`) on the eager path of a kernel backend (not
    traced: the launchers read the tensors' data, no autograd to keep out). Training: from x's own statistics
    (their partials first), from the given (mean, var), or from a PendingStats's partials merged in the same launch
    (_deferred.py); running buffers (when given) updated and counter (the BN's num_batches_tracked) incremented by
    that launch. Otherwise from the running buffers, which stay as they are."""
    c = x.shape[1]
    count = x.numel() // c
    if not training:
        return kb.bn_finalize(c, _ops._acc(x.dtype), mean=running_mean, var=running_var, gamma=bn_weight,
                              beta=bn_bias, eps=float(eps), count=count), False
    claimed = input_stats.claim() if isinstance(input_stats, _deferred.PendingStats) else None
    if claimed is not None:
        partials, mean, var = claimed
        return kb.bn_finalize(
            c, mean.dtype, partials=partials, mean=mean, var=var, gamma=bn_weight, beta=bn_bias,
            running_mean=running_mean, running_var=running_var, momentum=float(momentum), eps=float(eps),
            count=count, num_batches_tracked=counter), True
    from_x = input_stats is None
    m_in, v_in = (None, None) if from_x else input_stats
    return _ops._finalize(kb, x, m_in, v_in, bn_weight, bn_bias, running_mean, running_var, from_x, float(momentum),
                          float(eps), count, counter), True


def _traced_finalize(x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, input_stats, impl):
    """The [5, C] bn_finalize as the registered op (torch.compile, fake tensors): it never counts num_batches_tracked."""
    count = x.numel() // x.shape[1]
    if not training:
        return _ops.bn_finalize(x.detach(), running_mean.detach(), running_var.detach(), _detached(bn_weight),
                                _detached(bn_bias), None, None, False, 0.0, float(eps), count, impl)
    from_x = input_stats is None
    m_in, v_in = (None, None) if from_x else (s.detach() for s in input_stats)
    return _ops.bn_finalize(x.detach(), m_in, v_in, _detached(bn_weight), _detached(bn_bias), running_mean,
                            running_var, from_x, float(momentum), float(eps), count, impl)


def bn_relu_conv2d(
    x,
    weight,
    bias=None,
    *,
    bn_weight=None,
    bn_bias=None,
    running_mean=None,
    running_var=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    residual=None,
    backend="auto",
    sync_stats=False,
    process_group=None,
    activation="relu",
):
    """conv2d(relu(batch_norm(x)), weight, bias) (+ residual), fused.

    Same meaning as ``F.conv2d(F.relu(F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias,
    training, momentum, eps)), weight, bias, stride, padding, dilation, groups) (+ residual)``,
    including the in-place running-statistics update in training mode, without ever storing the
    activation relu(batch_norm(x)). sync_stats=True: training statistics over the process group
    (nn.SyncBatchNorm's semantics). Under torch.autocast, x/weight/bias/residual take the conv's
    autocast dtype; BN parameters and statistics stay float32. activation="identity": no ReLU, the conv
    reads batch_norm(x) itself (a unit that starts BN -> conv, as PyramidNet's do).
    """
    y, _, _ = bn_relu_conv2d_with_stats(
        x, weight, bias, bn_weight=bn_weight, bn_bias=bn_bias, running_mean=running_mean,
        running_var=running_var, training=training, momentum=momentum, eps=eps, stride=stride,
        padding=padding, dilation=dilation, groups=groups, residual=residual, backend=backend,
        sync_stats=sync_stats, process_group=process_group, activation=activation)
    return y


def bn_relu_conv2d_pair(
    x, weight, weight2, bias=None, bias2=None, *, bn_weight=None, bn_bias=None, running_mean=None,
    running_var=None, training=False, momentum=0.1, eps=1e-5, stride=1, padding=0, dilation=1, stride2=1,
    padding2=0, dilation2=1, backend="auto", sync_stats=False, process_group=None, activation="relu",
):
    """(conv2d(a, weight, bias, stride, padding, dilation), conv2d(a, weight2, bias2, stride2, padding2,
    dilation2)) for a = relu(batch_norm(x, ...)), fused, groups 1 -- a projection block's conv1 and
    shortcut. Same BN arguments and semantics as bn_relu_conv2d (the running buffers updated once); one
    autograd node, so the backward sums the two convs' gradients of a before the ReLU mask and runs the
    BN backward once, as eager does."""
    y, y2, _, _ = bn_relu_conv2d_pair_with_stats(
        x, weight, weight2, bias, bias2, bn_weight=bn_weight, bn_bias=bn_bias, running_mean=running_mean,
        running_var=running_var, training=training, momentum=momentum, eps=eps, stride=stride, padding=padding,
        dilation=dilation, stride2=stride2, padding2=padding2, dilation2=dilation2, backend=backend,
        sync_stats=sync_stats, process_group=process_group, activation=activation)
    return y, y2


def bn_relu_conv2d_with_stats(
    x, weight, bias=None, *, bn_weight=None, bn_bias=None, running_mean=None, running_var=None,
    training=False, momentum=0.1, eps=1e-5, stride=1, padding=0, dilation=1, groups=1, residual=None,
    backend="auto", input_stats=None, out_stats=False, sync_stats=False, process_group=None, activation="relu",
    _deferred=False, _num_batches_tracked=None,
):
    """The same op, for chaining fused layers.

    input_stats: (mean, biased var) of x per channel, already known (e.g. from the producer conv's
        epilogue); used in training instead of a pass over x. Running buffers are still updated here.
        They are this rank's statistics: with sync_stats they are synchronized here.
    out_stats: also return the per-channel (mean, biased var) of the output, computed in the conv
        epilogue, for the next BN. Otherwise the last two results are None.
    sync_stats: in training, use the batch statistics of the whole process group (default group, or
        process_group), with nn.SyncBatchNorm's semantics (see _sync.py). A no-op when torch.distributed
        is not initialized or the group has one process.
    _deferred (the library's blocks): the output statistics may come back as one PendingStats in place of
        (mean, var), None after it, whose merge the next fused layer's finalize does (_deferred.py).
    _num_batches_tracked (nn.py): the BN's counter, incremented once the call succeeded (in the finalize launch
        on the eager path of a kernel backend: eager's add_ is a launch of its own).
    """
    return conv_call(x, weight, bias, residual, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps,
                     stride, padding, dilation, groups, backend, input_stats, out_stats, sync_stats, process_group,
                     _relu(activation), _deferred, _num_batches_tracked)


def conv_call(x, weight, bias, residual, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps,
              stride, padding, dilation, groups, backend, input_stats, out_stats, sync_stats, process_group, relu,
              defer, counter):
    """bn_relu_conv2d_with_stats with its arguments by position (nn.py's modules call it so), activation as relu."""
    (x, weight, bias, residual), amp_off = _autocast_inputs(x, weight, bias, residual)
    with amp_off:
        return _with_stats(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps,
                           stride, padding, dilation, groups, residual, backend, input_stats, out_stats, sync_stats,
                           process_group, relu, defer, counter)


def _out_stats_arg(out_stats, defer, impl, x):
    """What the op gets for out_stats: DEFER on the eager path of a kernel backend when the caller passes
    the statistics on to the next fused layer, else the flag."""
    if out_stats and defer and impl in _KERNEL_BACKENDS and not _ops._traced(x):
        return _ops.DEFER
    return bool(out_stats)


def _stats_out(impl, out_arg, mean_y, var_y):
    """(mean, var) as the functional API returns them: a PendingStats and None when deferred."""
    if out_arg == _ops.DEFER:
        partials = _deferred.take(mean_y)
        if partials is not None:
            return _deferred.PendingStats(mean_y, var_y, partials, impl), None
    return mean_y, var_y


ACTIVATIONS = ("relu", "identity")


def _relu(activation) -> bool:
    """Whether the fused op applies ReLU after the batch norm; checked before anything runs."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
    return activation == "relu"


# Whether autocast is on for any device (not traceable: only asked outside torch.compile).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)
_NO_CONTEXT = contextlib.nullcontext()  # reusable: it holds no state


def _autocast_inputs(x, *operands):
    """Under torch.autocast, the conv's operands (x, then weights, biases, residual) in the dtype autocast
    would give the conv (x too: the BN+ReLU prologue reads it in that dtype); BN parameters, statistics and
    running buffers stay as they are (float32). Returns them (a tuple) with a context that turns autocast off
    around the op, so the reference path's inner ops are not cast a second time. float64 tensors are never
    cast, as autocast does."""
    if not torch.compiler.is_compiling() and not _any_autocast():  # the common case, in one C call
        return (x, *operands), _NO_CONTEXT
    dev = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    # Autocast has no state for meta tensors (shape-only runs): never autocast. Not
    # torch.amp.is_autocast_available: torch.compile (2.11's dynamo) cannot trace it, and fullgraph then fails.
    if not (isinstance(x, torch.Tensor) and dev != "meta" and torch.is_autocast_enabled(dev)):
        return (x, *operands), _NO_CONTEXT
    dt = torch.get_autocast_dtype(dev)

    def cast(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
            return t.to(dt)
        return t

    return tuple(cast(t) for t in (x, *operands)), torch.autocast(dev, enabled=False)


def bn_relu_conv2d_pair_with_stats(
    x, weight, weight2, bias=None, bias2=None, *, bn_weight=None, bn_bias=None, running_mean=None,
    running_var=None, training=False, momentum=0.1, eps=1e-5, stride=1, padding=0, dilation=1, stride2=1,
    padding2=0, dilation2=1, backend="auto", input_stats=None, out_stats=False, sync_stats=False,
    process_group=None, activation="relu", _deferred=False, _num_batches_tracked=None,
):
    """Two convs of one relu(batch_norm(x)): (y, y2, mean_y, var_y) with
    y = conv2d(a, weight, bias, stride, padding, dilation) and y2 = conv2d(a, weight2, bias2, stride2,
    padding2, dilation2), groups 1 both, no residual; the running buffers updated once. A projection block's
    conv1 and shortcut: one autograd node, so backward sums the two gradients of a before the ReLU mask and
    runs the BN backward once (as eager does; two bn_relu_conv2d calls would run it twice). mean_y/var_y:
    y's statistics when out_stats (as bn_relu_conv2d_with_stats), else None. Both convs are validated
    before anything runs. _num_batches_tracked: as bn_relu_conv2d_with_stats's."""
    return pair_call(x, weight, weight2, bias, bias2, bn_weight, bn_bias, running_mean, running_var, training, momentum,
                     eps, stride, padding, dilation, stride2, padding2, dilation2, backend, input_stats, out_stats,
                     sync_stats, process_group, _relu(activation), _deferred, _num_batches_tracked)


def pair_call(x, weight, weight2, bias, bias2, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps,
              stride, padding, dilation, stride2, padding2, dilation2, backend, input_stats, out_stats, sync_stats,
              process_group, relu, defer, counter):
    """bn_relu_conv2d_pair_with_stats with its arguments by position (nn.py's modules call it so), activation as
    relu."""
    (x, weight, bias, weight2, bias2), amp_off = _autocast_inputs(x, weight, bias, weight2, bias2)
    with amp_off:
        geo = validate(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum,
                       eps, stride, padding, dilation, 1, None, backend)
        try:
            geo2 = validate(x, weight2, bias2, bn_weight, bn_bias, running_mean, running_var, training, momentum,
                            eps, stride2, padding2, dilation2, 1, None, backend)
        except (TypeError, ValueError) as e:  # validate names the first conv's arguments
            raise type(e)(f"the second conv (weight2, bias2, stride2, padding2, dilation2): {e}") from None
        impl = resolve(backend, x.device, 1)
        if x.shape[0] == 0:
            y, y2 = _empty_batch(reference.bn_relu_conv2d_pair, x, weight, weight2, bias, bias2, bn_weight=bn_weight,
                                 bn_bias=bn_bias, running_mean=running_mean, running_var=running_var,
                                 training=training, momentum=momentum, eps=eps, stride=stride, padding=padding,
                                 dilation=dilation, stride2=stride2, padding2=padding2, dilation2=dilation2,
                                 activation="relu" if relu else "identity", sync=sync_stats,
                                 process_group=process_group)
            _count(counter)
            return (y, y2, *_empty_stats(y)) if out_stats else (y, y2, None, None)
        out_arg = _out_stats_arg(out_stats, defer, impl, x)
        if _kernel_eager_applies(impl, x, training, sync_stats, process_group):  # as _with_stats's
            mean, invstd, prologue, counter = _eager_bn(impl, x, bn_weight, bn_bias, running_mean, running_var,
                                                        training, momentum, eps, input_stats, counter)
            y, y2, mean_y, var_y = _ops.eager_pair((
                x, weight, bias, weight2, bias2, bn_weight, bn_bias, mean, invstd, training, float(eps), geo.stride,
                geo.padding, geo.dilation, geo.out_size, geo2.stride, geo2.padding, geo2.dilation, geo2.out_size,
                out_arg, impl, 0, prologue, relu))
            _count(counter)
        else:
            bn = _bn_inputs(x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, impl,
                            input_stats, sync_stats, process_group, counter)
            y, y2, mean_y, var_y = _ops.bn_relu_conv2d_pair(
                x, weight, bias, weight2, bias2, bn_weight, bn_bias, bn.mean, bn.invstd, training, float(eps),
                list(geo.stride), list(geo.padding), list(geo.dilation), list(geo.out_size), list(geo2.stride),
                list(geo2.padding), list(geo2.dilation), list(geo2.out_size), out_arg, impl, bn.gid,
                bn.prologue, relu)
            bn.update_running_stats()
    return (y, y2, *_stats_out(impl, out_arg, mean_y, var_y)) if out_stats else (y, y2, None, None)


def _with_stats(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps,
                stride, padding, dilation, groups, residual, backend, input_stats, out_stats, sync_stats,
                process_group, relu=True, defer=False, counter=None):
    geo = validate(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum,
                   eps, stride, padding, dilation, groups, residual, backend)
    impl = resolve(backend, x.device, geo.groups)
    if x.shape[0] and _kernel_eager_applies(impl, x, training, sync_stats, process_group):
        return _kernel_eager(impl, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum,
                             eps, geo, residual, input_stats, out_stats, relu, defer, counter)
    if x.shape[0] == 0:
        y = _empty_batch(reference.bn_relu_conv2d, x, weight, bias, bn_weight=bn_weight, bn_bias=bn_bias,
                         running_mean=running_mean, running_var=running_var, training=training, momentum=momentum,
                         eps=eps, stride=stride, padding=padding, dilation=dilation, groups=groups,
                         residual=residual, activation="relu" if relu else "identity", sync=sync_stats,
                         process_group=process_group)
        _count(counter)
        return (y, *_empty_stats(y)) if out_stats else (y, None, None)
    bn = _bn_inputs(x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, impl, input_stats,
                    sync_stats, process_group, counter)
    out_arg = _out_stats_arg(out_stats, defer, impl, x)
    y, mean_y, var_y = _ops.bn_relu_conv2d(
        x, weight, bias, bn_weight, bn_bias, bn.mean, bn.invstd, residual, training, float(eps),
        list(geo.stride), list(geo.padding), list(geo.dilation), list(geo.out_size), geo.groups,
        out_arg, impl, bn.gid, bn.prologue, relu)
    bn.update_running_stats()
    return (y, *_stats_out(impl, out_arg, mean_y, var_y)) if out_stats else (y, None, None)


def _kernel_eager_applies(impl, x, training, sync_stats, process_group) -> bool:
    """Whether a call takes the kernel backends' eager path (_kernel_eager, the pair's alike): a kernel backend, not
    traced, no process-group statistics. The caller checks the batch is not empty."""
    return impl in _KERNEL_BACKENDS and not _ops._traced(x) and not (
        training and sync_stats and _sync.group_id(process_group))


def _eager_bn(impl, x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, input_stats, counter):
    """(mean, invstd, the prologue's (scale, beta), the counter still to count or None) of x's BN on the eager path of
    a kernel backend without process-group statistics: _eager_finalize's one launch (two with x's statistics)."""
    fin, counted = _eager_finalize(_ops._kernels(impl), x, bn_weight, bn_bias, running_mean, running_var, training,
                                   momentum, eps, input_stats, counter)
    mean, _, invstd, scale, beta = fin.unbind(0)  # one view op, not one per row
    return mean, invstd, (scale, beta), None if counted else counter


def _kernel_eager(impl, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, geo,
                  residual, input_stats, out_stats, relu, defer, counter):
    """_with_stats's common call: a kernel backend on the eager path (not traced), no process-group statistics, a
    non-empty batch. The same launches and autograd node as the general path, without its layers (issue 30: they
    cost a layer's forward ~20 us of host time): the BN's finalize (running buffers and counter updated in its
    launch), then the conv op (_ops.eager_conv). The geometry goes as validate's tuples; the registered op's
    List[int] schema only matters when traced."""
    mean, invstd, prologue, counter = _eager_bn(impl, x, bn_weight, bn_bias, running_mean, running_var, training,
                                                momentum, eps, input_stats, counter)
    out_arg = _ops.DEFER if (out_stats and defer) else bool(out_stats)
    y, mean_y, var_y = _ops.eager_conv((x, weight, bias, bn_weight, bn_bias, mean, invstd, residual, training,
                                        float(eps), geo.stride, geo.padding, geo.dilation, geo.out_size, geo.groups,
                                        out_arg, impl, 0, prologue, relu))
    _count(counter)
    if not out_stats:
        return y, None, None
    return (y, *_stats_out(impl, out_arg, mean_y, var_y))


# The batch norm's keyword arguments, as every op here takes them (and bn_add_relu's shortcut_bn dict).
BN_KEYWORDS = ("bn_weight", "bn_bias", "running_mean", "running_var", "training", "momentum", "eps")


def bn_add_relu(x, shortcut, *, bn_weight=None, bn_bias=None, running_mean=None, running_var=None, training=False,
                momentum=0.1, eps=1e-5, shortcut_bn=None, backend="auto", activation="relu", input_stats=None,
                shortcut_stats=None, _num_batches_tracked=None, _shortcut_num_batches_tracked=None):
    """relu(batch_norm(x, ...) + s) in one pass: the end of a post-activation ResNet block (torchvision's and
    timm's `relu(bn3(conv3(out)) + identity)`), s = shortcut, or batch_norm(shortcut, **shortcut_bn) when
    shortcut_bn is a dict with the BN keyword arguments (bn_weight, bn_bias, running_mean, running_var,
    training, momentum, eps; missing ones take the defaults) -- the projection shortcut's BN (its
    downsample conv's output). Same meaning as eager's composition, including each BN's in-place
    running-statistics update in training; neither BN's output is ever stored, and backward keeps only x and
    the shortcut. input_stats / shortcut_stats: (mean, biased var) of x / the shortcut, already known (from
    a producer conv's epilogue), used in training instead of a statistics pass. activation="identity": no
    ReLU after the add. _num_batches_tracked / _shortcut_num_batches_tracked (nn_postact.py): each BN's counter,
    counted once the call succeeded, as bn_relu_conv2d_with_stats's."""
    relu = _relu(activation)
    sbn = None
    if shortcut_bn is not None:
        if not isinstance(shortcut_bn, dict) or set(shortcut_bn) - set(BN_KEYWORDS):
            raise TypeError(f"shortcut_bn must be a dict with keys among {', '.join(BN_KEYWORDS)}, "
                            f"got {shortcut_bn!r}")
        sbn = dict(zip(BN_KEYWORDS, (None, None, None, None, False, 0.1, 1e-5)), **shortcut_bn)
    bn_args = (bn_weight, bn_bias, running_mean, running_var, training, momentum, eps)
    s_bn_args = tuple(sbn[k] for k in BN_KEYWORDS) if sbn is not None else None
    # Memoized as validate is (_plan.py): a miss checks everything, so a bad call raises on every call.
    key = _plan.bn_add_key(x, shortcut, backend, bn_args, s_bn_args)
    if key is None or key not in _plan.BN_ADD_VALIDATED:
        validate_bn_add(x, shortcut, backend)
        validate_bn(x, *bn_args)
        if sbn is not None:
            validate_bn(shortcut, *s_bn_args, who="shortcut_bn ")
        if key is not None:
            _plan.remember(_plan.BN_ADD_VALIDATED, key, True)
    else:
        _plan.hits += 1
    impl = resolve(backend, x.device, 1)
    if x.shape[0] == 0:
        y = _empty_batch(reference.bn_add_relu, x, shortcut, bn_weight=bn_weight, bn_bias=bn_bias,
                         running_mean=running_mean, running_var=running_var, training=training, momentum=momentum,
                         eps=eps, shortcut_bn=shortcut_bn, activation=activation, sync=False, process_group=None)
        _count(_num_batches_tracked)
        _count(_shortcut_num_batches_tracked)
        return y
    bn = _bn_inputs(x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, impl, input_stats,
                    False, None, _num_batches_tracked)
    s_args = (None, None, None, None, None, False)
    if sbn is not None:
        s = _bn_inputs(shortcut, sbn["bn_weight"], sbn["bn_bias"], sbn["running_mean"], sbn["running_var"],
                       sbn["training"], sbn["momentum"], sbn["eps"], impl, shortcut_stats, False, None,
                       _shortcut_num_batches_tracked)
        s_args = (s.mean, s.invstd, sbn["bn_weight"], sbn["bn_bias"], s.prologue, sbn["training"])
    y = _ops_postact.bn_add_relu(x, shortcut, bn.mean, bn.invstd, bn_weight, bn_bias, bn.prologue, training, *s_args,
                                 relu, impl)
    bn.update_running_stats()
    if sbn is not None:
        s.update_running_stats()
    return y


def _empty_batch(eager_op, *args, sync, process_group, **kw):
    """An empty batch (N = 0) as eager runs it: an empty result (with autograd: empty dx and residual
    gradient, zero gradients for the weights and BN affine), running buffers unchanged (eager's batch_norm
    leaves them as they were; nn.py still counts num_batches_tracked, as nn.BatchNorm2d does). No kernel
    runs, so this is the plain-PyTorch composition. With synchronized statistics the other processes would
    wait for this one's count, which the fused path does not send for an empty batch: refused."""
    if sync and kw["training"] and _sync.group_id(process_group):
        raise ValueError("an empty batch (N = 0) with sync_stats=True over a process group is not supported")
    return eager_op(*args, **kw)


def _empty_stats(y):
    """The output statistics of an empty batch: undefined, NaN (as torch.mean of nothing is)."""
    nan = torch.full((y.shape[1],), float("nan"), device=y.device,
                     dtype=torch.float64 if y.dtype == torch.float64 else torch.float32)
    return nan, nan.clone()


class _BNInputs(NamedTuple):
    """What the conv ops take of the BN: mean, invstd, the kernels' (scale, beta) ([2, C] when traced, else the pair
    of rows) or None, the sync
    group id; and the running-buffer update still to do after the op (the reference path's: the kernel
    backends' finalize kernel has done it already)."""

    mean: torch.Tensor
    invstd: torch.Tensor
    prologue: object
    gid: int
    pending: tuple
    counter: object = None  # num_batches_tracked still to count (None: nothing to count, or counted already)

    def update_running_stats(self):
        # After the op succeeded, so a failed call leaves the buffers as they were.
        if self.pending:
            update_running_stats(*self.pending)
        _count(self.counter)


def _count(counter):
    if counter is not None:
        counter.add_(1)


def _bn_inputs(x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, impl, input_stats,
               sync_stats, process_group, counter=None):
    """x's BN as the conv ops take it (validation has run). Kernel backends without sync: one bn_finalize
    launch (after the statistics partials when x's own statistics are needed) gives mean, invstd and the
    prologue's scale/beta and updates the running buffers in place -- no ATen tail. Otherwise the
    statistics (synchronized over the group with sync_stats) and invstd in ATen ops. counter: the BN's
    num_batches_tracked, counted by the finalize launch where there is one on the eager path, else by
    update_running_stats after the op."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    count = x.numel() // x.shape[1]
    gid = _sync.group_id(process_group) if (training and sync_stats) else 0
    if impl in _KERNEL_BACKENDS and not gid:
        if _ops._traced(x):
            fin = _traced_finalize(x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps,
                                   input_stats, impl)
            return _BNInputs(fin[0], fin[2], fin[3:5], 0, (), counter)
        fin, counted = _eager_finalize(_ops._kernels(impl), x, bn_weight, bn_bias, running_mean, running_var,
                                       training, momentum, eps, input_stats, counter)
        mean, _, invstd, scale, beta = fin.unbind(0)  # one view op, not one per row (_ops._pack_prologue)
        return _BNInputs(mean, invstd, (scale, beta), 0, (), None if counted else counter)
    if training:
        if input_stats is not None:
            mean, var = (s.detach().to(acc) for s in input_stats)
        else:
            mean, var = _ops.batch_stats(x.detach(), impl)
        if gid:
            mean, var, count = _sync.gather_stats(mean, var, count, gid)
    else:
        mean, var = running_mean.detach().to(acc), running_var.detach().to(acc)
    pending = (running_mean, running_var, mean, var, count, momentum) if (training and running_mean is not None) else ()
    return _BNInputs(mean, torch.rsqrt(var + eps), None, gid, pending, counter)


def update_running_stats(running_mean, running_var, mean, var, count, momentum):
    """nn.BatchNorm2d's update: EMA with `momentum`, the running variance unbiased (count / (count-1))."""
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        unbiased = var * (count / (count - 1))
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
