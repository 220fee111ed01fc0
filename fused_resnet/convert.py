"""convert(): fuse every BN -> ReLU -> Conv2d chain in any model that it can prove safe.

Found with torch.fx: a BatchNorm2d module whose only user is a ReLU (nn.ReLU, F.relu, torch.relu, in
place or not) whose users are all Conv2d modules. Each conv becomes a FusedBNReLUConv2d sharing the BN
and conv modules (no copies); when a conv's only user is an addition, the other operand becomes the
fused epilogue's residual. With several convs on one BN, only the first updates the running stats.
A module that fx cannot trace is searched child by child instead. Anything else is left alone and the
report says why.
"""
from __future__ import annotations

import copy
import logging
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._validate import output_size
from .nn import FusedBNReLUConv2d, PreActBlock, _check_pair

log = logging.getLogger("fused_resnet.convert")

_RELUS_F = (F.relu, torch.relu, torch.relu_, F.relu_)
_ADDS = (operator.add, operator.iadd, torch.add)


@dataclass
class Entry:
    where: str
    fused: bool
    why: str

    def __str__(self):
        return f"{'fused  ' if self.fused else 'skipped'}  {self.where}: {self.why}"


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        if isinstance(m, (FusedBNReLUConv2d, PreActBlock)):
            return True
        return super().is_leaf_module(m, qualname)


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
# converted, and our fused/unfused models. Module-level functions: a converted model still pickles.

def _aliases_to_original(module, state_dict, prefix, local_metadata):
    for alias, orig in module._fused_resnet_aliases.items():
        head = f"{prefix}{alias}."
        for key in [k for k in state_dict if k.startswith(head)]:
            value = state_dict.pop(key)
            state_dict.setdefault(f"{prefix}{orig}.{key[len(head):]}", value)  # a shared BN: saved once


def _original_to_aliases(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs):
    used = set()
    for alias, orig in module._fused_resnet_aliases.items():
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
    if conv.groups != 1:
        return (f"{type(conv).__name__} has groups={conv.groups}: no fused kernel for grouped convolutions, "
                "so it stays with eager (same result, no speed lost)")
    if bn.eps < 0:
        return f"BatchNorm2d eps={bn.eps} is negative: the fused op refuses it, eager does not"
    return None


def _fuse_graph(gm: fx.GraphModule, prefix: str, backend: str, report: list) -> int:
    count = 0
    aliases = {}
    for bn_node in list(gm.graph.nodes):
        bn = _module(gm, bn_node, nn.BatchNorm2d)
        if bn is None:
            continue
        where = f"{prefix}{bn_node.target}"
        users = list(bn_node.users)
        if len(users) != 1 or not _is_relu(gm, users[0]):
            report.append(Entry(where, False, f"its output goes to {_users(gm, users, prefix) or 'nothing'}; "
                                              "fusion needs it to feed exactly one ReLU (post-activation "
                                              "BN -> add -> ReLU, or BN -> conv, cannot be fused)"))
            continue
        relu_node = users[0]
        if relu_node.args[1:]:
            report.append(Entry(where, False, "its ReLU is called with extra arguments (a threshold or "
                                              "similar), which the fused op does not compute"))
            continue
        convs = list(relu_node.users)
        bad = [u for u in convs if _module(gm, u, nn.Conv2d) is None or u.args[0] is not relu_node]
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
        gm.graph.erase_node(relu_node)
        gm.graph.erase_node(bn_node)
    if count:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
        gm._fused_resnet_aliases = aliases
        gm.register_state_dict_post_hook(_aliases_to_original)
        gm.register_load_state_dict_pre_hook(_original_to_aliases)
    return count


def _convert_module(module: nn.Module, prefix: str, backend: str, report: list) -> nn.Module:
    if isinstance(module, (FusedBNReLUConv2d, PreActBlock)):
        report.append(Entry(prefix.rstrip(".") or "<model>", False, "already fused"))
        return module
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    if not has_bn:
        return module
    try:
        graph = _Tracer().trace(module)
    except Exception as e:  # fx cannot trace data-dependent control flow; search the children
        reason = f"{type(e).__name__}: {e}".splitlines()[0][:100]
        report.append(Entry(prefix.rstrip(".") or "<model>", False, f"not traceable as a whole ({reason}); "
                                                                    "converting its children"))
        for name, child in list(module.named_children()):
            new = _convert_module(child, f"{prefix}{name}.", backend, report)
            if new is not child:
                setattr(module, name, new)
        return module
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__ + "Fused")
    if _fuse_graph(gm, prefix, backend, report) == 0:
        return module
    gm.training = module.training
    return gm


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
    out = _convert_module(model, "", backend, report)
    out.fusion_report = report
    log.info("fused_resnet.convert: %d fused, %d skipped\n%s", sum(e.fused for e in report),
             sum(not e.fused for e in report), "\n".join(str(e) for e in report))
    return out
