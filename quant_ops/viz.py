"""Graphviz drawings of a float or a quantized graph, compact enough for ResNet-50/DenseNet.

Only what a reader needs is drawn: layers, data inputs, outputs and quantizers.  Weights,
BN statistics, quantizer state and gradient-sum copies are folded away, since they add a
node per layer input and triple the picture without saying anything about the dataflow.
The graph is plain data (``quant_ops.graph.ir``); nothing in it is evaluated.
"""
from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path

import graphviz

from .errors import QuantOpsError
from .graph.ir import Graph, Node, flag
from . import methods
from .graph.quantizers import is_grad_sum, state_variables

PARAM_SUFFIXES = ("_weight", "_bias", "_gamma", "_beta", "_running_mean", "_running_var",
                  "_moving_mean", "_moving_var")
# (legend text, fill colour, ops); anything else is drawn grey
FAMILIES = (
    ("conv / FC / deconv", "#9ecae1", {"Convolution", "FullyConnected", "Deconvolution"}),
    ("batch norm", "#c7e9c0", {"BatchNorm", "_contrib_SyncBatchNorm", "LayerNorm",
                               "InstanceNorm", "GroupNorm"}),
    ("activation", "#dadaeb", {"Activation", "LeakyReLU", "relu", "sigmoid", "tanh", "clip",
                               "softmax", "SoftmaxActivation", "SoftmaxOutput"}),
    ("pooling", "#fcc5c0", {"Pooling", "_contrib_AdaptiveAvgPooling2D"}),
    ("add / concat", "#fee391", {"elemwise_add", "_Plus", "_plus", "broadcast_add", "add_n",
                                 "ElementWiseSum", "Concat", "concat"}),
)
OTHER_FILL = "#f0f0f0"
QUANT_FILL, QUANT_EDGE = "#fd8d3c", "#a63603"
SHORT_OP = {"Convolution": "Conv", "FullyConnected": "FC", "Deconvolution": "Deconv",
            "BatchNorm": "BN", "elemwise_add": "add"}


def _hidden(g: Graph) -> set[int]:
    """Parameters, quantizer state and gradient-sum copies.  A variable is a parameter when
    every use is a non-first input, or feeds a weight quantizer (maybe through a copy)."""
    uses: dict = defaultdict(list)
    for i, n in g.ops():
        for pos, e in enumerate(n.inputs):
            uses[e[0]].append((i, pos))
    hidden = {i for i, n in enumerate(g.nodes) if is_grad_sum(n)}
    state = state_variables(g)
    for i, n in enumerate(g.nodes):
        if not n.is_var:
            continue
        flat = [u for c, p in uses[i]
                for u in (uses[c] if is_grad_sum(g.nodes[c]) else [(c, p)])]
        if n.name.endswith(PARAM_SUFFIXES) or n.name in state or flat and all(
                p > 0 or (methods.is_quantizer(g.nodes[c].op)
                          and flag(g.nodes[c].attrs, "is_weight")) for c, p in flat):
            hidden.add(i)
    return hidden


def _dims(s: str | None) -> list[str]:
    return re.findall(r"\d+", s or "")


def quantizer_label(n: Node) -> str:
    """E.g. "int8 W8 per-channel" or "int8 A8": method, role and bits, granularity."""
    m = methods.of_op(n.op)
    if m is None:
        return n.op
    bits = m.nbits(n.attrs)
    if m.is_weight(n.attrs):
        gran = "per-channel" if m.per_axis(n.attrs) else "per-tensor"
        return f"{m.name} W{bits} {gran}"
    return f"{m.name} A{bits}"


def _op_label(n: Node) -> str:
    a = n.attrs
    parts = [SHORT_OP.get(n.op, n.op)]
    if n.op == "Activation" or n.op == "LeakyReLU":
        parts = [a.get("act_type", n.op)]
    elif n.op == "Pooling":
        parts = [a.get("pool_type", "max") + "pool"]
        parts.append("global" if flag(a, "global_pool")
                     else "x".join(_dims(a.get("kernel"))))
    if n.op in ("Convolution", "Deconvolution"):
        stride = _dims(a.get("stride"))
        parts.append("x".join(_dims(a.get("kernel"))) +
                     (f"/{stride[0]}" if stride and set(stride) != {"1"} else ""))
    parts.append(a.get("num_filter") or a.get("num_hidden") or "")
    return " ".join(p for p in parts if p)


def _text(s: str) -> graphviz.nohtml:
    """A plain (non-HTML) label; backslashes kept literal so DOT escapes cannot fire."""
    return graphviz.nohtml(s.replace("\\", "\\\\").replace("\n", "\\n"))


def to_dot(graph: Graph, title: str | None = None,
           shapes: dict | None = None) -> graphviz.Digraph:
    """The DOT description (no rendering); ``shapes`` (name -> shape) labels the inputs."""
    shapes = shapes or {}
    g, hidden = graph, _hidden(graph)
    visible = [i for i in range(len(g.nodes)) if i not in hidden]
    quants = [i for i in visible if methods.is_quantizer(g.nodes[i].op)]
    ops = [g.nodes[i].name for i in visible if not g.nodes[i].is_var and i not in quants]
    prefix = os.path.commonprefix(ops) if len(ops) > 1 else ""
    prefix = prefix[:prefix.rfind("_") + 1]
    dpi = 72 if len(visible) > 300 else 96     # tall PNGs for big nets, still legible
    d = graphviz.Digraph("graph", format="svg")
    d.attr("graph", rankdir="TB", dpi=str(dpi), nodesep="0.15", ranksep="0.2",
           size=f"{16000 // dpi},{28000 // dpi}", fontname="Helvetica", fontsize="11",
           labelloc="t", labeljust="l", label=_legend(g, title, len(quants), len(ops)))
    d.attr("node", shape="box", style="filled,rounded", fontname="Helvetica", fontsize="10",
           height="0.25", margin="0.06,0.02", penwidth="0.8")
    d.attr("edge", arrowsize="0.5", penwidth="0.8", color="#555555")
    fills = {op: fill for _, fill, members in FAMILIES for op in members}
    for i in visible:
        n, nid = g.nodes[i], f"n{i}"
        if methods.is_quantizer(n.op):
            d.node(nid, _text(quantizer_label(n)), shape="ellipse", style="filled,bold",
                   fillcolor=QUANT_FILL, color=QUANT_EDGE, penwidth="2", margin="0.02,0",
                   tooltip=_text(n.name), **{"class": "quantizer"})
        elif n.is_var:
            shape = shapes.get(n.name) or _dims(n.attrs.get("__shape__")) or ""
            dims = "x".join(str(s) for s in shape)
            d.node(nid, _text(f"{n.name}\n{dims}".strip()), shape="ellipse", style="solid",
                   **{"class": "input"})
        else:
            short = n.name[len(prefix):] if n.name.startswith(prefix) else n.name
            short = short[:-4] if short.endswith("_fwd") and len(short) > 4 else short
            d.node(nid, _text(f"{_op_label(n)}\n{short}"),
                   fillcolor=fills.get(n.op, OTHER_FILL), tooltip=_text(n.name),
                   **{"class": "op"})
        for e in ([] if n.is_var else n.inputs):
            src = g.nodes[e[0]].inputs[0][0] if is_grad_sum(g.nodes[e[0]]) else e[0]
            if src not in hidden:
                q = methods.is_quantizer(g.nodes[src].op)
                d.edge(f"n{src}", nid, **({"color": QUANT_EDGE, "penwidth": "1.2"} if q else {}))
    for k, h in enumerate(g.heads):
        src = g.nodes[h[0]].inputs[0][0] if is_grad_sum(g.nodes[h[0]]) else h[0]
        d.node(f"out{k}", "output", shape="ellipse", style="solid")
        if src not in hidden:
            d.edge(f"n{src}", f"out{k}")
    return d


def _legend(g: Graph, title: str | None, n_quant: int, n_ops: int) -> str:
    """Title, a one-line summary and the colour key, as one HTML label over the drawing
    (a legend cluster would be laid out with the graph and stretch it)."""
    summary = (f"quantized: {n_quant} quantizers, {n_ops} ops" if n_quant
               else f"float: {n_ops} ops")
    cells = "".join(f'<TD BGCOLOR="{fill}">{html.escape(name)}</TD>'
                    for name, fill, _ in FAMILIES)
    cells += f'<TD BGCOLOR="{OTHER_FILL}">other</TD>'
    cells += f'<TD BGCOLOR="{QUANT_FILL}"><B>quantizer</B> (W=weight, A=activation bits)</TD>'
    head = html.escape(title or ("graph" if g.source.startswith("<") else Path(g.source).stem))
    return (f'<<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="2" CELLPADDING="3">'
            f'<TR><TD COLSPAN="7" BORDER="0" ALIGN="LEFT"><FONT POINT-SIZE="14"><B>{head}</B>'
            f' - {html.escape(summary)}</FONT></TD></TR><TR>{cells}</TR></TABLE>>')


def draw(graph: Graph, path_stem: str | Path, title: str | None = None,
         formats: tuple = ("svg", "png"), shapes: dict | None = None) -> list[Path]:
    """Write ``<stem>.<fmt>`` for each format ("gv" is the DOT source) and return the paths.

    One ``dot`` run lays the graph out once for all formats, into a temporary directory
    beside the outputs; files are moved into place only after it succeeded, so a failure
    leaves no partial file.
    """
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    if not formats or not all(re.fullmatch(r"[a-z0-9]+", f) for f in formats):
        raise QuantOpsError(f"draw: bad formats {formats!r} (e.g. ('svg', 'png'))")
    exe = shutil.which("dot")
    if exe is None:
        raise QuantOpsError("graphviz 'dot' not found: apt-get install graphviz")
    source = to_dot(graph, title, shapes).source
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=stem.parent, prefix=".viz-") as tmp:
        gv = Path(tmp) / "graph.gv"
        gv.write_text(source)
        args = [exe]
        for f in formats:
            if f != "gv":
                args += [f"-T{f}", f"-o{Path(tmp) / ('graph.' + f)}"]
        if len(args) > 1:
            try:
                proc = subprocess.run(args + [str(gv)], capture_output=True, text=True,
                                      timeout=600)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise QuantOpsError(f"draw: running dot failed ({e})") from None
            if proc.returncode != 0:
                raise QuantOpsError(f"draw: dot exited with {proc.returncode}: "
                                    f"{proc.stderr.strip()[-500:]}")
        out = []
        for f in formats:
            target = stem.with_name(f"{stem.name}.{f}")
            os.replace(Path(tmp) / f"graph.{f}", target)
            out.append(target)
    return out
