"""The FX graphs Dynamo hands the backend: their higher-order ops' subgraphs, a copy to rewrite,
the restart Dynamo needs when p arrives as a symbolic float, and where a node came from (its
module path and source line)."""

import copy
import os
import re

import torch
from torch._dynamo.exc import TensorifyScalarRestartAnalysis
from torch._dynamo.symbolic_convert import TensorifyState
from torch.fx import Node
from torch.utils._sympy.symbol import SymT, symbol_is_type

from .patterns import is_dropout

CHECKPOINT = torch.ops.higher_order.tag_activation_checkpoint


def graph_modules(gm, reason=None, seen=None):
    """gm and the subgraphs of its higher-order ops, recursively, each with the reason its
    dropouts are left alone (None where they may be rewritten). Activation checkpointing's
    bodies may: when AOTAutograd recomputes a random op (our mask and window draws are), it
    replays the generator state the forward drew with, so backward sees the forward's mask."""
    seen = set() if seen is None else seen
    if id(gm) in seen:
        return
    seen.add(id(gm))
    yield gm, reason
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
            continue
        for arg in node.args:
            sub = getattr(gm, arg.target, None) if isinstance(arg, Node) and arg.op == "get_attr" else None
            if isinstance(sub, torch.fx.GraphModule):
                inner = f"inside the subgraph {arg.target} of {node.target.name()}"
                yield from graph_modules(sub, reason or (None if node.target is CHECKPOINT else inner), seen)


def copy_graph(gm):
    """A GraphModule with its own graph and class (recompile sets forward on the class), and
    copies of its subgraphs (a checkpointed body may be rewritten), sharing parameters and
    Dynamo's attributes (meta, shape_env, ...) with gm."""
    graph = copy.deepcopy(gm.graph)  # copies nodes and their meta dicts, not the fake tensors in them
    for old, node in zip(gm.graph.nodes, graph.nodes, strict=True):
        for key, value in old.__dict__.items():  # e.g. placeholders' _dynamo_source, read by AOTAutograd
            node.__dict__.setdefault(key, value)
    new = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    for key, value in gm.__dict__.items():
        new.__dict__.setdefault(key, value)
    new.meta = dict(getattr(gm, "meta", {}))
    for node in graph.find_nodes(op="get_attr"):
        if isinstance(getattr(gm, node.target, None), torch.fx.GraphModule):
            setattr(new, node.target, copy_graph(getattr(gm, node.target)))
    return new


def restart_with_constant_p(gm):
    """With dynamic=True, Dynamo passes float attributes (nn.Dropout.p, a global P) as tensors
    read back with .item(), so p reaches the pass as a node. AOTAutograd would later ask
    Dynamo to retrace with those floats constant, after a wasted compile; ask now, the same way.
    Inside a checkpointed region the retrace cannot make p constant (the body reads it with
    .item() itself), so Dynamo would retrace forever: there a p the shape environment has
    pinned (patterns.dropout_p) is taken as it is."""
    names = set()
    for sub, _ in graph_modules(gm):
        for node in filter(is_dropout, sub.graph.nodes):
            p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p")
            value = p.meta.get("example_value") if isinstance(p, torch.fx.Node) else None
            if not isinstance(value, torch.SymFloat) or (sub is not gm and value.node.expr.is_number):
                continue
            expr = getattr(value.node, "_expr", value.node.expr)  # the symbol itself, before its replacement
            names |= {str(s) for s in expr.free_symbols if symbol_is_type(s, SymT.FLOAT)}
    if names:
        for name in sorted(names):
            TensorifyState.specialize(name)
        raise TensorifyScalarRestartAnalysis


def module_path(node):
    """The dropout's module as named_modules() names it from the compiled frame's module.
    Dynamo's path may pass through the modules' dicts: a module with its own __getattr__ (PEFT's
    wrappers) is read as L['self'].__dict__['_modules']['base_model']; those hops are dropped."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]  # e.g. "L['self'].layers[0].dropout"
    path = re.sub(r"^[LG]\['[^']*'\]", "", path)  # the frame's local or global the module came from
    path = re.sub(r"\['?([^'\]]*)'?\]", r".\1", path)
    return ".".join(part for part in path.split(".") if part and part not in ("__dict__", "_modules"))


TORCH_DIR = os.path.dirname(torch.__file__)


def location(node):
    """file:line of the innermost user frame that made the node (torch's own frames, such as
    a default-device context's, are skipped)."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', trace)
    user = [(path, line) for path, line in frames if not path.startswith(TORCH_DIR)]
    if not user:
        return ""
    path, line = user[-1]
    return f"{os.path.basename(path)}:{line}"
