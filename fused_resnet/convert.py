"""convert(): fuse every BN -> ReLU -> Conv2d chain in any model that it can prove safe.

Found with torch.fx: a BatchNorm2d module whose only user is a ReLU (nn.ReLU, F.relu, torch.relu, in
place or not) whose users are all Conv2d modules -- or a norm+activation module (a BatchNorm2d
subclass that applies ReLU itself, as timm's BatchNormAct2d does; checked numerically, not by class
name) whose users are all Conv2d modules. nn.Identity placeholders in between (timm's drop_block, aa)
do not break a chain. Each conv becomes a FusedBNReLUConv2d sharing the BN and conv modules (no
copies); when a conv's only user is an addition, the other operand becomes the fused epilogue's
residual. A BN feeding exactly two convs (a pre-activation block's conv1 and projection shortcut) becomes
one FusedBNReLUConv2dPair: one op, so the BN's backward runs once on the summed gradient. With more convs
on one BN, only the first updates the running stats.

What a conversion must never do: change what the model computes in either mode, or touch the model it
was given. So BatchNorm modules are fx leaves (tracing into them would run their buffer updates and
freeze `training` into the graph), so are mode-dependent modules with no BatchNorm inside (drop-path,
drop-block), every buffer is restored after tracing, and a module is traced in both modes: if its
forward differs between train() and eval() (torchvision's dense layer calls F.dropout(training=
self.training)), both traces are fused and a ByMode module runs the one of the current mode. A module
that fx cannot trace is searched child by child too. The report names every BatchNorm of the model
once: fused (with which conv) or skipped (why, in words).
"""
from __future__ import annotations

import copy
import functools
import inspect
import logging
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._validate import output_size
from .nn import FusedBNReLUConv2d, FusedBNReLUConv2dPair, PreActBlock, _check_pair

log = logging.getLogger("fused_resnet.convert")

_RELUS_F = (F.relu, torch.relu, torch.relu_, F.relu_)
_BN = nn.modules.batchnorm._BatchNorm
_ADDS = (operator.add, operator.iadd, torch.add)


@dataclass
class Entry:
    where: str
    fused: bool
    why: str

    def __str__(self):
        return f"{'fused  ' if self.fused else 'skipped'}  {self.where}: {self.why}"


@functools.lru_cache(maxsize=None)
def _reads_training(cls) -> bool:
    """Whether cls.forward's source reads `.training` (its result depends on train()/eval())."""
    try:
        return ".training" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return True  # no source to read: assume it may


class _Tracer(fx.Tracer):
    """Leaves: BatchNorms (tracing into one runs its buffer updates and freezes `training`), our fused
    modules, and mode-dependent modules with no BatchNorm inside (drop-path, drop-block, custom
    dropout): kept as modules, they follow train()/eval() after conversion and hide no chain."""

    def is_leaf_module(self, m, qualname):
        if isinstance(m, (FusedBNReLUConv2d, PreActBlock, _BN)):
            return True
        if (not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) and _reads_training(type(m))
                and not any(isinstance(d, _BN) for d in m.modules())):
            return True
        return super().is_leaf_module(m, qualname)


def _trace(module: nn.Module) -> fx.Graph:
    """fx graph of module in its current mode, leaving every buffer as it was (a forward that updates
    a buffer, like a counter, runs for real while fx traces it)."""
    saved = {name: b.detach().clone() for name, b in module.named_buffers()}
    try:
        return _Tracer().trace(module)
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                if name in saved:
                    b.copy_(saved[name])


def _trace_both_modes(module: nn.Module):
    """{True: train-mode graph, False: eval-mode graph}; the module's mode is restored."""
    mode = module.training
    try:
        graphs = {}
        for training in (True, False):
            module.train(training)
            graphs[training] = _trace(module)
    finally:
        module.train(mode)
    return graphs


class ByMode(nn.Module):
    """A converted module whose forward differed between train() and eval() (dropout or another
    mode-dependent branch that tracing would freeze): one fused graph per mode, run by self.training.
    Both graphs hold the same BatchNorm and conv modules, so parameters, buffers, .to() and mode are
    shared; only the train graph is a registered child, and state_dict keys are the original module's."""

    def __init__(self, train_graph: nn.Module, eval_graph: nn.Module):
        super().__init__()
        self.train_graph = train_graph
        object.__setattr__(self, "_eval_graph", eval_graph)  # not a child: its state is the train graph's
        self.register_state_dict_post_hook(_drop_train_graph_prefix)
        self.register_load_state_dict_pre_hook(_add_train_graph_prefix)

    def forward(self, *args, **kwargs):
        return (self.train_graph if self.training else self._eval_graph)(*args, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        self._eval_graph.train(mode)
        return self


def _drop_train_graph_prefix(module, state_dict, prefix, local_metadata):
    head = f"{prefix}train_graph."
    for key in [k for k in state_dict if k.startswith(head)]:
        state_dict[prefix + key[len(head):]] = state_dict.pop(key)


def _add_train_graph_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                            error_msgs):
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "train_graph.")]:
        state_dict[f"{prefix}train_graph.{key[len(prefix):]}"] = state_dict.pop(key)


def _bn_kind(bn: nn.Module):
    """"bn" for a plain batch norm, "bn+relu" for a norm+activation module that applies ReLU after it,
    or (None, why). Decided by running the module once in eval mode on a copy (no side effects) and
    comparing with F.batch_norm and relu(F.batch_norm): general, not a list of class names."""
    if type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm) or not list(bn.children()):
        return "bn", None
    probe = copy.deepcopy(bn).eval().float()
    c = probe.num_features
    x = torch.randn(2, c, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float32) * 2
    x = x.to(next((t.device for t in probe.parameters()), torch.device("cpu")))
    with torch.no_grad():
        try:
            y = probe(x)
        except Exception as e:  # noqa: BLE001 - a module we cannot run alone is not one we can fuse
            return None, f"{type(bn).__name__} could not be run on its own ({type(e).__name__})"
        use_batch = probe.running_mean is None
        plain = F.batch_norm(x, probe.running_mean, probe.running_var, probe.weight, probe.bias, use_batch, 0.0,
                             probe.eps)
    if y.shape == plain.shape and torch.allclose(y, torch.relu(plain), rtol=1e-5, atol=1e-6):
        return "bn+relu", None
    if y.shape == plain.shape and torch.allclose(y, plain, rtol=1e-5, atol=1e-6):
        return "bn", None
    acts = [type(m).__name__ for m in bn.children() if not isinstance(m, nn.Identity)]
    return None, (f"{type(bn).__name__} applies {', '.join(acts) or 'something'} after the batch norm, not ReLU: "
                  "only BN -> ReLU is fused")


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
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.ReLU)
    if node.op == "call_function" and node.target in _RELUS_F:
        return True
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _module(gm, node, cls):
    if node.op != "call_module":
        return None
    m = gm.get_submodule(node.target)
    return m if isinstance(m, cls) else None


def _residual_add(conv_node):
    """The add node that takes conv_node's output and one other tensor, if that is its only use."""
    if len(conv_node.users) != 1:
        return None, None
    add = next(iter(conv_node.users))
    if add.op != "call_function" or add.target not in _ADDS or add.kwargs:
        return None, None
    if len(add.args) != 2:
        return None, None
    a, b = add.args
    other = b if a is conv_node else a
    if other is conv_node or not isinstance(other, fx.Node):
        return None, None
    return add, other


def _fused_residual_call(module, x, residual):
    """Residual into the epilogue when shapes agree exactly; otherwise the plain (broadcasting) add."""
    if (isinstance(residual, torch.Tensor) and residual.dtype == x.dtype and residual.dim() == 4
            and residual.device == x.device):
        conv = module.conv
        padding = (0, 0) if conv.padding == "valid" else conv.padding
        out = output_size(x.shape[2:], conv.kernel_size, conv.stride, padding, conv.dilation)
        if tuple(residual.shape) == (x.shape[0], conv.out_channels, *out):
            return module(x, residual)
    return module(x) + residual


fx.wrap("_fused_residual_call")


# Checkpoint keys: a fused layer "fused_<conv>" holds the original BN and conv modules as .bn / .conv, and
# fx drops the original names from the traced module. These hooks keep the original model's keys in
# state_dict() and accept them in load_state_dict(), so checkpoints move between the original, the
# converted, and our fused/unfused models. Module-level functions: a converted model still pickles
# and deep-copies.

def _aliases_to_original(module, state_dict, prefix, local_metadata, *, aliases):
    for alias, orig in aliases.items():
        head = f"{prefix}{alias}."
        for key in [k for k in state_dict if k.startswith(head)]:
            value = state_dict.pop(key)
            state_dict.setdefault(f"{prefix}{orig}.{key[len(head):]}", value)  # a shared BN: saved once


def _original_to_aliases(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs, *, aliases):
    used = set()
    for alias, orig in aliases.items():
        head = f"{prefix}{orig}."
        for key in [k for k in state_dict if k.startswith(head)]:
            state_dict[f"{prefix}{alias}.{key[len(head):]}"] = state_dict[key]
            used.add(key)
    for key in used:  # after every alias is filled: a BN shared by several fused convs feeds them all
        del state_dict[key]


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


def _unfusable(bn, conv, backend):
    """Why this (BN, conv) pair is left to eager even though it is a BN -> ReLU -> conv chain, or None.
    A converted model must run wherever the original runs and compute the same thing."""
    if type(conv).forward is not nn.Conv2d.forward:
        return (f"{type(conv).__name__} overrides Conv2d.forward (weight standardization, dynamic 'same' "
                "padding, ...): the fused op computes a plain convolution, so it stays with eager")
    if conv.groups != 1:
        return (f"{type(conv).__name__} has groups={conv.groups}: no fused kernel for grouped convolutions, "
                "so it stays with eager (same result, no speed lost)")
    if bn.eps < 0:
        return f"BatchNorm2d eps={bn.eps} is negative: the fused op refuses it, eager does not"
    return None


def _fuse_pair(gm, bn_node, relu_node, convs, prefix, backend, aliases, report) -> int:
    """A BN whose ReLU feeds exactly two convs (a pre-activation block's conv1 and projection shortcut): one
    FusedBNReLUConv2dPair, so the backward runs the BN's once on the summed gradient, as eager does (two
    fused layers would run it twice). The pair has no residual epilogue: an add after one of its convs
    stays in the graph, where the conv on its other side (the block's last, fused later) takes it into
    its own epilogue. Returns the number of convs fused."""
    bn = gm.get_submodule(bn_node.target)
    mods = [gm.get_submodule(c.target) for c in convs]
    name = "fused_" + "_and_".join(str(c.target).replace(".", "_") for c in convs)
    gm.add_submodule(name, FusedBNReLUConv2dPair(bn, *mods, backend=backend))
    aliases[f"{name}.bn"] = str(bn_node.target)
    aliases[f"{name}.conv"], aliases[f"{name}.conv2"] = (str(c.target) for c in convs)
    with gm.graph.inserting_after(relu_node):
        call = gm.graph.call_module(name, (bn_node.args[0],))
    with gm.graph.inserting_after(call):
        first = gm.graph.call_function(operator.getitem, (call, 0))
    with gm.graph.inserting_after(first):
        second = gm.graph.call_function(operator.getitem, (call, 1))
    for conv_node, out, other in ((convs[0], first, convs[1]), (convs[1], second, convs[0])):
        conv_node.replace_all_uses_with(out)
        gm.graph.erase_node(conv_node)
        report.append(Entry(f"{prefix}{bn_node.target} -> {prefix}{conv_node.target}", True,
                            f"one op with {prefix}{other.target} (the BN shared by both: its backward runs "
                            "once)"))
    return 2


def _fuse_graph(gm: fx.GraphModule, prefix: str, backend: str, report: list) -> int:
    count = 0
    aliases = {}
    for bn_node in list(gm.graph.nodes):
        bn = _module(gm, bn_node, (nn.BatchNorm2d, nn.SyncBatchNorm))
        if bn is None:
            continue
        where = f"{prefix}{bn_node.target}"
        kind, why = _bn_kind(bn)
        if kind is None:
            report.append(Entry(where, False, why))
            continue
        if kind == "bn+relu":
            relu_node, passed = bn_node, []  # the module applies the ReLU itself
        else:
            relu_node, passed = _skip_identity(gm, bn_node)
            if relu_node is None or not _is_relu(gm, relu_node):
                report.append(Entry(where, False, f"its output goes to {_users(gm, list(bn_node.users), prefix) or 'nothing'}; "
                                                  "fusion needs it to feed exactly one ReLU (post-activation "
                                                  "BN -> add -> ReLU, or BN -> conv, cannot be fused)"))
                continue
            if relu_node.args[1:]:
                report.append(Entry(where, False, "its ReLU is called with extra arguments (a threshold or "
                                                  "similar), which the fused op does not compute"))
                continue
        # The ReLU output's users, each followed through Identity placeholders.
        convs, between = [], []
        for u in list(relu_node.users):
            node, ids = u, []
            while node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Identity) \
                    and len(node.users) == 1:
                ids.append(node)
                node = next(iter(node.users))
            convs.append(node)
            between += ids
        src_of = {c: (c.args[0] if c.args else None) for c in convs}
        feeds = set([relu_node] + between)  # a conv reads the ReLU output, maybe through Identity nodes
        bad = [u for u in convs if _module(gm, u, nn.Conv2d) is None or src_of[u] not in feeds]
        if bad:
            also = " besides the conv(s)" if len(bad) < len(convs) else ""
            report.append(Entry(where, False, f"its ReLU output is needed by {_users(gm, bad, prefix)}{also}; "
                                              "the fused op never materializes relu(bn(x)), so every user "
                                              "must be a Conv2d"))
            continue
        try:
            for u in convs:
                _check_pair(bn, gm.get_submodule(u.target))
        except (TypeError, ValueError) as e:
            report.append(Entry(where, False, str(e)))
            continue
        why = next((w for w in (_unfusable(bn, gm.get_submodule(u.target), backend) for u in convs) if w), None)
        if why:
            report.append(Entry(where, False, why))
            continue
        if len(convs) == 2:
            count += _fuse_pair(gm, bn_node, relu_node, convs, prefix, backend, aliases, report)
            convs = []
        for i, conv_node in enumerate(convs):
            conv = gm.get_submodule(conv_node.target)
            fused = FusedBNReLUConv2d.from_modules(bn, conv, backend=backend)
            fused.update_running_stats = i == 0
            name = f"fused_{str(conv_node.target).replace('.', '_')}"
            gm.add_submodule(name, fused)
            aliases[f"{name}.bn"], aliases[f"{name}.conv"] = str(bn_node.target), str(conv_node.target)
            add, other = _residual_add(conv_node)
            if add is not None:
                # After the add: both the conv's input and the other operand are defined by then.
                with gm.graph.inserting_after(add):
                    mod_node = gm.graph.get_attr(name)
                with gm.graph.inserting_after(mod_node):
                    new = gm.graph.call_function(_fused_residual_call, (mod_node, bn_node.args[0], other))
                add.replace_all_uses_with(new)
                gm.graph.erase_node(add)
                how = "with the residual add in the epilogue"
            else:
                with gm.graph.inserting_after(conv_node):
                    new = gm.graph.call_module(name, (bn_node.args[0],))
                conv_node.replace_all_uses_with(new)
                how = "no residual"
            gm.graph.erase_node(conv_node)
            shared = f", shares the BN with {len(convs) - 1} other conv(s)" if len(convs) > 1 else ""
            report.append(Entry(f"{prefix}{bn_node.target} -> {prefix}{conv_node.target}", True, how + shared))
            count += 1
        # Now unused, users before their inputs: Identity nodes after the ReLU, the ReLU, the Identity
        # nodes between BN and ReLU, the BN.
        for node in reversed(between):
            gm.graph.erase_node(node)
        if relu_node is not bn_node:
            gm.graph.erase_node(relu_node)
        for node in reversed(passed):
            gm.graph.erase_node(node)
        gm.graph.erase_node(bn_node)
    if count:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
        # The aliases travel inside the hooks (partials of module-level functions): a GraphModule's
        # deepcopy keeps its hooks but not extra attributes, and pickling needs no closures.
        gm.register_state_dict_post_hook(functools.partial(_aliases_to_original, aliases=aliases))
        gm.register_load_state_dict_pre_hook(functools.partial(_original_to_aliases, aliases=aliases))
    return count


def _convert_module(module: nn.Module, prefix: str, backend: str, report: list) -> nn.Module:
    if isinstance(module, (FusedBNReLUConv2d, FusedBNReLUConv2dPair, PreActBlock)):
        report.append(Entry(prefix.rstrip(".") or "<model>", False, "already fused"))
        return module
    if isinstance(module, _BN):  # a leaf of every trace: nothing inside it to fuse
        return module
    has_bn = any(isinstance(m, _BN) for m in module.modules())
    if not has_bn:
        return module
    try:
        graphs = _trace_both_modes(module)
    except Exception as e:  # fx cannot trace data-dependent control flow; search the children
        why = f"not traceable as a whole ({type(e).__name__}: {str(e).splitlines()[0][:100]})"
        report.append(Entry(prefix.rstrip(".") or "<model>", False, f"{why}; converting its children"))
        for name, child in list(module.named_children()):
            new = _convert_module(child, f"{prefix}{name}.", backend, report)
            if new is not child:
                setattr(module, name, new)
        return module
    same = graphs[True].python_code("self").src == graphs[False].python_code("self").src
    cls = type(module).__name__ + "Fused"
    if same:
        gm = fx.GraphModule(module, graphs[module.training], class_name=cls)
        if _fuse_graph(gm, prefix, backend, report) == 0:
            return module
        gm.training = module.training
        return gm
    # The forward depends on the mode: fuse both traces (the same chains, the same modules) and pick
    # by mode at run time, so dropout and the like keep following train()/eval().
    fused = {}
    for training in (True, False):
        entries = []
        gm = fx.GraphModule(module, graphs[training], class_name=cls)
        fused[training] = (gm, _fuse_graph(gm, prefix, backend, entries), entries)
    (gt, nt, et), (ge, _, ee) = fused[True], fused[False]
    if [str(e) for e in et] != [str(e) for e in ee]:
        report.append(Entry(prefix.rstrip(".") or "<model>", False,
                            "its forward differs between train() and eval() in a way that changes which chains "
                            "exist; left as it is"))
        return module
    report.extend(et)
    if nt == 0:
        return module
    out = ByMode(gt, ge)
    out.train(module.training)
    return out


def _complete(report: list, bns):
    """One entry for every BatchNorm of the model: those no traced graph reached get one saying where
    they sit (inside a module kept as it is: already fused, or one whose children were searched)."""
    named = {e.where.split(" -> ")[0] for e in report}
    for name, kind in bns:
        if name in named:
            continue
        parents = sorted((e for e in report if not e.fused and name.startswith(e.where + ".")),
                         key=lambda e: len(e.where))
        if any(e.why == "already fused" for e in parents):
            why = "inside an already fused module"
        elif parents:
            why = f"inside {parents[-1].where}, which is left as it is ({parents[-1].why})"
        else:
            why = (f"{kind} not reached by a traced graph (it is called inside a module that is kept as it "
                   "is), so no chain through it could be seen")
        report.append(Entry(name, False, why))


def convert(model: nn.Module, backend: str = "auto", inplace: bool = False) -> nn.Module:
    """Return a model computing the same function with its safe BN->ReLU->Conv2d chains fused.

    inplace=False works on a deep copy; inplace=True converts the given model's children in place and
    shares its parameters (the returned module is the one to use either way: a traced top level comes
    back as a new fx.GraphModule). The returned module has `fusion_report`, a list of entries saying
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
    bns = [(name, type(m).__name__) for name, m in model.named_modules() if isinstance(m, _BN)]
    out = _convert_module(model, "", backend, report)
    _complete(report, bns)
    out.fusion_report = report
    log.info("fused_resnet.convert: %d fused, %d skipped\n%s", sum(e.fused for e in report),
             sum(not e.fused for e in report), "\n".join(str(e) for e in report))
    return out
