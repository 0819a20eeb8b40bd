"""Layer sensitivity: which quantized layers cost the most, and which to keep in float.

Two views per layer, both against the float network:

* the layer's own output in the fully quantized network (SQNR, cosine over the calibration
  set): where the error builds up;
* the network with only that layer left in float (output SQNR over the calibration set,
  and top-1 accuracy when labelled data is given): what keeping it float would buy.

The second view is what a deployment decision needs (mixed precision: keep the few layers
with the largest gain in float), the first explains it.  Activation ranges are calibrated
once: they are statistics of the float network (as TensorRT calibrates), so they do not
change when another layer stays float, and every configuration reuses them.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from ..calib.graph_calib import calibrate_graph
from ..errors import QuantOpsError
from ..fileio import atomic_write_text, staged_dir
from ..graph.ir import Graph, Node
from ..graph.params import as_numpy
from ..graph.quantize import strip_quantizers
from ..graph.quantizers import activation_quantizers
from ..policy import QuantPolicy
from ..prepare import QuantizedGraph, as_policy, quantize_graph
from .common import predict, runner

log = logging.getLogger(__name__)
DEFAULT_MIN_GAIN = 0.1      # top-1 points a float layer must win to be kept float
DEFAULT_MIN_GAIN_DB = 1.0   # without accuracy: dB of network output SQNR


# -- the report ----------------------------------------------------------------------------
@dataclass
class LayerRow:
    """One quantized layer.  SQNRs in dB (inf: exact), accuracies in percent."""
    name: str
    op: str
    weight_bits: int | None
    activation_bits: int | None
    sqnr_db: float            # this layer's output, fully quantized net vs float net
    cosine: float
    out_sqnr_db: float        # network output vs float with only this layer in float
    out_gain_db: float        # out_sqnr_db minus the fully quantized net's output SQNR
    acc_layer_float: float | None = None   # top-1 with only this layer in float
    gain: float | None = None              # acc_layer_float - acc_quant


@dataclass
class SensitivityReport:
    """What ``layer_sensitivity`` measured, and what to do about it (``keep_float``,
    ``policy_with_skips``); accuracies are None when no labelled data was given."""
    rows: list[LayerRow]
    acc_float: float | None
    acc_quant: float | None
    out_sqnr_quant_db: float          # network output SQNR of the fully quantized net
    policy: dict                      # the analysed policy, as plain data
    method: str                       # calibration method
    calib_images: int
    eval_images: int
    seconds: float
    model: str = ""
    notes: list = field(default_factory=list)

    @property
    def has_accuracy(self) -> bool:
        return self.acc_quant is not None

    def row(self, name: str) -> LayerRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise QuantOpsError(f"'{name}' is not a quantized layer of this report (layers: "
                            f"{_listing(r.name for r in self.rows)})")

    def keep_float(self, max_layers: int | None = None,
                   min_gain: float | None = None) -> list[str]:
        """Layers worth keeping in float, largest gain first.  The gain is in top-1 points
        when the report has accuracies (``min_gain`` default 0.1), else the network output
        SQNR gain in dB (default 1 dB): a layer's own SQNR only falls with depth, so
        ranking by it would just pick the last layers."""
        if max_layers is not None and (not isinstance(max_layers, int) or max_layers < 0):
            raise QuantOpsError(f"max_layers must be an integer >= 0, got {max_layers!r}")
        if self.has_accuracy:
            least = DEFAULT_MIN_GAIN if min_gain is None else min_gain
            key = lambda r: (r.gain, r.out_gain_db)  # noqa: E731
            ranked = [r for r in self.rows if r.gain is not None and r.gain >= least - 1e-9]
        else:
            least = DEFAULT_MIN_GAIN_DB if min_gain is None else min_gain
            key = lambda r: (r.out_gain_db,)  # noqa: E731
            ranked = [r for r in self.rows if r.out_gain_db >= least]
        ranked.sort(key=key, reverse=True)
        names = [r.name for r in ranked]
        return names if max_layers is None else names[:max_layers]

    def policy_with_skips(self, policy: QuantPolicy | str | dict | None = None,
                          names: Iterable[str] | None = None) -> dict:
        """A policy dict (ready to save as the policy file) that keeps ``names`` in float on
        top of ``policy``; defaults: the analysed policy and ``keep_float()``."""
        names = self.keep_float() if names is None else list(names)
        for n in names:
            self.row(n)  # an unknown name is an error, not a silent no-op
        base = as_policy(self.policy if policy is None else policy)
        return _skipping(base, names).to_dict()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["keep_float"] = self.keep_float()
        d["policy_skip"] = self.policy_with_skips()
        return d

    def to_json(self) -> str:
        """JSON with non-finite numbers as null (JSON has no infinity)."""
        return json.dumps(_finite(self.to_dict()), indent=1)

    def write_html(self, path: str | Path, keep: list[str] | None = None) -> Path:
        """One self-contained HTML file (plots embedded as PNG), written atomically;
        ``keep``: the layers it proposes to keep float (default ``keep_float()``)."""
        return atomic_write_text(path, render_html(self, keep))


# -- measuring -----------------------------------------------------------------------------
class _Agreement:
    """Running sums over batches for the SQNR and cosine of ``q`` against ``f``."""

    def __init__(self) -> None:
        self.ff = self.qq = self.fq = self.ee = 0.0

    def add(self, f: np.ndarray, q: np.ndarray) -> None:
        f = np.asarray(f, np.float64).ravel()
        q = np.asarray(q, np.float64).ravel()
        self.ff += float(f @ f)
        self.qq += float(q @ q)
        self.fq += float(f @ q)
        e = f - q
        self.ee += float(e @ e)

    @property
    def sqnr_db(self) -> float:
        if not (math.isfinite(self.ee) and math.isfinite(self.ff)):
            return float("nan")
        if self.ee == 0:
            return float("inf")
        if self.ff == 0:
            return float("-inf")
        return 10.0 * math.log10(self.ff / self.ee)

    @property
    def cosine(self) -> float:
        if self.ff == 0 and self.qq == 0:
            return 1.0
        if self.ff == 0 or self.qq == 0:
            return 0.0
        return self.fq / math.sqrt(self.ff * self.qq)


def _listing(names: Iterable[str], n: int = 8) -> str:
    names = list(names)
    more = f", ... ({len(names)} in all)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _literal(name: str) -> str:
    """An fnmatch pattern that matches exactly ``name`` (``*?[`` bracketed)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _skipping(policy: QuantPolicy, names: Sequence[str]) -> QuantPolicy:
    d = policy.to_dict()
    skip = d.setdefault("skip", {})
    have = list(skip.get("names", []))
    skip["names"] = have + [p for p in map(_literal, names) if p not in have]
    return QuantPolicy.from_dict(d, source=f"{policy.source} + skips")


def _as_batch(b: Any) -> np.ndarray:
    return as_numpy(b, np.float32)


def _quantized_layers(q: QuantizedGraph) -> list[tuple[str, str, int | None, int | None]]:
    """(name, op, weight bits, activation bits) of each layer with a quantizer on an
    input, in graph order."""
    info: dict = {}
    for r in q.table:
        if r["input"] not in ("weight", "data"):
            continue  # inputs of a shared-scale add/concat/pooling: not a layer
        d = info.setdefault(r["node"], {"op": r["op"]})
        d["weight" if r["input"] == "weight" else "data"] = r["bits"]
    # a layer whose data input is a tensor quantized for another layer first has no row of
    # its own for it: find its quantizer in the graph
    nodes = q.graph.nodes
    for n in nodes:
        if n.name in info and "data" not in info[n.name] and n.inputs:
            src = nodes[n.inputs[0][0]]
            if src.attrs.get("is_weight") in ("False", "0", "false"):
                info[n.name]["data"] = int(src.attrs.get("nbits", "0")) or None
    return [(n.name, info[n.name]["op"], info[n.name].get("weight"), info[n.name].get("data"))
            for n in nodes if n.name in info]


def _activation_quantizers(graph: Graph) -> dict:
    """{name: (op, attributes)} of every quantizer on an activation."""
    return {q.name: (q.node.op, sorted(q.attrs.items())) for q in activation_quantizers(graph)}


def _with_ranges(qs: QuantizedGraph, known: dict, calibrated: dict, batches: list,
                 method: str, data_name: str) -> dict:
    """Params of ``qs`` with the calibrated state of the fully quantized graph, when every
    activation quantizer of ``qs`` is one of its (same name, op and attributes); else
    ``qs`` is calibrated anew."""
    if all(known.get(k) == v for k, v in _activation_quantizers(qs.graph).items()):
        return {**qs.params, **{k: v for k, v in calibrated.items() if k in qs.params}}
    log.info("calibrating again: keeping a layer float changed an activation quantizer")
    params, _ = calibrate_graph(qs.graph, qs.params, batches, method, data_name,
                                progress=False)
    return params


def _accuracy(graph: Graph, params: dict, x: np.ndarray, y: np.ndarray, data_name: str,
              batch_size: int) -> float:
    scores = predict(graph, params, x, batch_size, data_name)
    if scores.ndim != 2:
        raise QuantOpsError(f"{graph.source}: accuracy needs class scores (N, classes) as "
                            f"the first output, got shape {scores.shape}")
    return round(float((scores.argmax(1) == y).mean() * 100), 6)  # no float noise in gains


def _check_eval(eval_data, eval_limit: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    if eval_data is None:
        return None
    try:
        x, y = eval_data
    except (TypeError, ValueError):
        raise QuantOpsError("eval_data must be a pair (images, labels)") from None
    x, y = _as_batch(x), as_numpy(y)
    if y.ndim != 1 or len(x) != len(y):
        raise QuantOpsError(f"eval_data: {len(x)} images but labels of shape {y.shape} "
                            "(need one label per image)")
    if eval_limit is not None:
        if not isinstance(eval_limit, int) or eval_limit <= 0:
            raise QuantOpsError(f"eval_limit must be an integer > 0, got {eval_limit!r}")
        x, y = x[:eval_limit], y[:eval_limit]
    if len(x) == 0:
        raise QuantOpsError("eval_data is empty")
    return x, y.astype(np.int64)


def _probe_graph(graph: Graph, layers: list[str]) -> Graph:
    """The graph with a copy of each named layer as an output, then its first head.

    Copies, not the layers' own outputs: MXNet 1.9's MKLDNN conv+sum fusion fails to bind
    ("Check failed: idx_g.input_nodes().size() == in_shapes->size()") when a fused
    convolution's output is also a graph output; a copy has no add to fuse with."""
    index = graph.index()
    nodes = list(graph.nodes)
    heads = []
    for name in layers:
        n = nodes[index[name]]
        heads.append([len(nodes), 0, 0])
        nodes.append(Node(n.op, f"{n.name}_qo_probe", dict(n.attrs), [list(e) for e in n.inputs]))
    return Graph(nodes, heads + [list(graph.heads[0])], dict(graph.attrs), graph.source)


def _outputs_over(graph: Graph, params: dict, batches: list, data_name: str) -> Iterable[list]:
    """The graph's outputs for each batch (one executor per batch shape)."""
    runs: dict = {}
    for b in batches:
        if b.shape not in runs:
            runs[b.shape] = runner(graph, params, b.shape, data_name)
        yield runs[b.shape](b)


def layer_sensitivity(float_graph: Graph, float_params: dict,
                      policy: QuantPolicy | str | dict, calib_batches: Iterable,
                      eval_data: tuple | None = None, *, method: str = "minmax",
                      fold_bn: str | None = "deploy", data_name: str = "data",
                      layers: Sequence[str] | None = None, eval_limit: int | None = None,
                      batch_size: int = 500, progress: bool = True,
                      model: str = "") -> SensitivityReport:
    """Per quantized layer: its output's SQNR/cosine in the fully quantized net, and the
    network's output SQNR (and top-1 on ``eval_data=(x, y)``, inputs already normalized)
    with only that layer in float.  ``layers`` limits the analysis to some layers;
    ``eval_limit`` evaluates on the first images only."""
    t0 = time.perf_counter()
    batches = [_as_batch(b) for b in calib_batches]
    if not batches:
        raise QuantOpsError("the calibration set is empty")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise QuantOpsError(f"batch_size must be an integer > 0, got {batch_size!r}")
    ev = _check_eval(eval_data, eval_limit)
    pol = as_policy(policy)
    q = quantize_graph(float_graph, float_params, pol, fold_bn=fold_bn)
    found = _quantized_layers(q)
    if not found:
        raise QuantOpsError(f"{float_graph.source}: the policy quantizes no layer")
    if layers is not None:
        known = {name for name, *_ in found}
        for n in layers:
            if n not in known:
                raise QuantOpsError(f"'{n}' is not a quantized layer (quantized: "
                                    f"{_listing(name for name, *_ in found)})")
        found = [f for f in found if f[0] in set(layers)]
    qparams, _ = calibrate_graph(q.graph, q.params, batches, method, data_name,
                                 progress=False)
    # what calibration set (whatever state the quantizers keep), for reuse below
    calibrated = {k: v for k, v in qparams.items()
                  if k not in q.params or not np.array_equal(v, q.params[k])}
    known = _activation_quantizers(q.graph)

    # float reference: the same (BN-folded) graph without quantizers
    ref = strip_quantizers(q.graph)
    names = [name for name, *_ in found]
    per_layer = [_Agreement() for _ in found]
    out_quant = _Agreement()
    ref_heads = []
    pairs = zip(_outputs_over(_probe_graph(ref, names), q.params, batches, data_name),
                _outputs_over(_probe_graph(q.graph, names), qparams, batches, data_name))
    for fo, qo in pairs:
        for agg, f, qv in zip(per_layer, fo, qo):
            agg.add(f, qv)
        out_quant.add(fo[-1], qo[-1])
        ref_heads.append(fo[-1])

    acc_float = acc_quant = None
    if ev is not None:
        x, y = ev
        acc_float = _accuracy(float_graph, float_params, x, y, data_name, batch_size)
        acc_quant = _accuracy(q.graph, qparams, x, y, data_name, batch_size)
        log.info("top-1: float %.2f%%, quantized %.2f%% (%d images)", acc_float, acc_quant,
                 len(x))

    rows = []
    for (name, op, wb, ab), agg in tqdm(list(zip(found, per_layer)), desc="layer sensitivity",
                                        disable=not progress):
        qs = quantize_graph(float_graph, float_params, _skipping(pol, [name]), fold_bn=fold_bn)
        if any(r["node"] == name for r in qs.table):
            raise QuantOpsError(f"internal: skipping '{name}' left it quantized")
        params = _with_ranges(qs, known, calibrated, batches, method, data_name)
        out = _Agreement()
        for f, (o,) in zip(ref_heads, _outputs_over(_probe_graph(qs.graph, []), params,
                                                     batches, data_name)):
            out.add(f, o)
        row = LayerRow(name, op, wb, ab, agg.sqnr_db, agg.cosine, out.sqnr_db,
                       out.sqnr_db - out_quant.sqnr_db)
        if ev is not None:
            row.acc_layer_float = _accuracy(qs.graph, params, ev[0], ev[1], data_name,
                                            batch_size)
            row.gain = round(row.acc_layer_float - acc_quant, 6)
        rows.append(row)
        log.debug("%s: SQNR %.1f dB, float-layer output SQNR %.1f dB, top-1 %s", name,
                  row.sqnr_db, row.out_sqnr_db, row.acc_layer_float)
    return SensitivityReport(rows, acc_float, acc_quant, out_quant.sqnr_db, pol.to_dict(),
                             method, sum(len(b) for b in batches),
                             0 if ev is None else len(ev[0]),
                             round(time.perf_counter() - t0, 2), model, list(q.notes))


# -- HTML ----------------------------------------------------------------------------------
def _finite(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "&infin;" if v > 0 else "&minus;&infin;"
    return f"{v:.{digits}f}"


def _bar_png(names: list[str], values: list[float], xlabel: str, title: str,
             highlight: set, signed: bool) -> str:
    """A horizontal bar chart (layers top to bottom in graph order) as base64 PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    finite = [v for v in values if math.isfinite(v)]
    top = max([abs(v) for v in finite] + [1.0])
    shown = [v if math.isfinite(v) else (float("nan") if math.isnan(v) else
                                         math.copysign(top * 1.1, v)) for v in values]
    fig = Figure(figsize=(8, 1.2 + 0.28 * len(names)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    pos = np.arange(len(names))
    colors = ["#d62728" if n in highlight else "#1f77b4" for n in names]
    ax.barh(pos, np.nan_to_num(shown), color=colors)
    for p, v, s in zip(pos, values, shown):
        if not math.isfinite(v):
            ax.text(0 if math.isnan(v) else s, p, " nan" if math.isnan(v) else " inf",
                    va="center", fontsize=8)
    ax.set_yticks(pos)
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    if signed:
        ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(xlabel + ("; red: keep in float" if highlight else ""))
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """body{font-family:sans-serif;margin:2em;max-width:70em;color:#222}
table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px}
th{background:#f0f0f0}td.n{text-align:right;font-family:monospace}tr.keep{background:#fde8e8}
pre{background:#f6f6f6;padding:1em;overflow-x:auto}img{max-width:100%}"""


def render_html(rep: SensitivityReport, keep: list[str] | None = None) -> str:
    """The report as one HTML page; every name from the model is escaped."""
    import yaml

    e = html.escape
    keep = rep.keep_float() if keep is None else list(keep)
    for n in keep:
        rep.row(n)
    names = [r.name for r in rep.rows]
    img1 = _bar_png(names, [r.sqnr_db for r in rep.rows], "SQNR (dB), higher is better",
                    "Layer output SQNR in the fully quantized network", set(keep), False)
    if rep.has_accuracy:
        img2 = _bar_png(names, [r.gain for r in rep.rows], "top-1 gain (points)",
                        "Accuracy gained by keeping only this layer in float", set(keep), True)
    else:
        img2 = _bar_png(names, [r.out_gain_db for r in rep.rows], "output SQNR gain (dB)",
                        "Network output SQNR gained by keeping only this layer in float",
                        set(keep), True)
    policy = rep.policy_with_skips(names=keep)
    unit = "accuracy points" if rep.has_accuracy else "dB of network output SQNR"
    summary = [("model", e(rep.model or "(unnamed)")),
               ("policy", e(str(rep.policy.get("preset") or "custom"))),
               ("calibration", f"{e(rep.method)}, {rep.calib_images} images"),
               ("top-1 float", _fmt(rep.acc_float)), ("top-1 quantized", _fmt(rep.acc_quant)),
               ("evaluation images", str(rep.eval_images) if rep.has_accuracy else "none"),
               ("network output SQNR, quantized (dB)", _fmt(rep.out_sqnr_quant_db)),
               ("time (s)", _fmt(rep.seconds, 1))]
    head_cells = ["#", "layer", "op", "bits w/a", "SQNR (dB)", "cosine",
                  "output SQNR, this layer float (dB)", "output SQNR gain (dB)",
                  "top-1, this layer float", "top-1 gain"]
    body = []
    for i, r in enumerate(rep.rows):
        bits = f"{r.weight_bits or '&ndash;'}/{r.activation_bits or '&ndash;'}"
        cls = ' class="keep"' if r.name in keep else ""
        body.append(f"<tr{cls}><td class=n>{i}</td><td>{e(r.name)}</td><td>{e(r.op)}</td>"
                    f"<td>{bits}</td><td class=n>{_fmt(r.sqnr_db)}</td>"
                    f"<td class=n>{_fmt(r.cosine, 5)}</td><td class=n>{_fmt(r.out_sqnr_db)}</td>"
                    f"<td class=n>{_fmt(r.out_gain_db)}</td>"
                    f"<td class=n>{_fmt(r.acc_layer_float)}</td>"
                    f"<td class=n>{_fmt(r.gain)}</td></tr>")
    keep_html = ("<ol>" + "".join(f"<li>{e(n)} (gain {_fmt(g)})</li>" for n, g in
                                 ((n, rep.row(n).gain if rep.has_accuracy else
                                   rep.row(n).out_gain_db) for n in keep)) + "</ol>"
                 if keep else "<p>None: no layer gains enough.</p>")
    title = f"Layer sensitivity{': ' + rep.model if rep.model else ''}"
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{e(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
        f"<h1>{e(title)}</h1>",
        "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in summary)
        + "</table>",
        "<p>SQNR = 10 log10(sum f&sup2; / sum (f &minus; q)&sup2;) over the calibration set, "
        "f the float network's tensor and q the quantized network's. The layer SQNR is "
        "cumulative (errors of earlier layers included); the gains measure what keeping "
        "only that layer in float buys.</p>",
        "<h2>Per-layer SQNR</h2>", f'<img alt="SQNR per layer" src="data:image/png;base64,{img1}">',
        "<h2>Gain from keeping one layer in float</h2>",
        f'<img alt="gain per layer" src="data:image/png;base64,{img2}">',
        "<h2>All layers</h2>",
        "<table><tr>" + "".join(f"<th>{h}</th>" for h in head_cells) + "</tr>"
        + "".join(body) + "</table>",
        f"<h2>Keep in float (largest gain first, in {unit})</h2>", keep_html,
        "<h2>Policy that keeps them in float</h2>",
        "<p>Save as <code>policy_skip.yaml</code> and pass it as the policy.</p>",
        f"<pre>{e(yaml.safe_dump(policy, sort_keys=False))}</pre>",
        "<details><summary>as JSON</summary>",
        f"<pre>{e(json.dumps(policy, indent=1))}</pre></details>",
        "</body>", "</html>", ""])


# -- the three files -------------------------------------------------------------------------
def write_reports(rep: SensitivityReport, out_dir: str | Path, keep: list[str] | None = None,
                  policy: QuantPolicy | str | dict | None = None, comment: str = "") -> Path:
    """``report.html``, ``report.json`` and ``policy_skip.yaml`` (``policy`` keeping ``keep``
    in float; defaults: the analysed policy, ``keep_float()``) into ``out_dir``, all or
    none; ``comment`` heads the YAML file."""
    import yaml

    keep = rep.keep_float() if keep is None else list(keep)
    skip_policy = rep.policy_with_skips(policy, keep)
    out = Path(out_dir)
    with staged_dir(out) as tmp:
        rep.write_html(tmp / "report.html", keep)
        d = rep.to_dict()
        d.update(keep_float=keep, policy_skip=skip_policy)
        (tmp / "report.json").write_text(json.dumps(_finite(d), indent=1))
        head = "".join(f"# {line}\n" for line in comment.splitlines())
        (tmp / "policy_skip.yaml").write_text(head + yaml.safe_dump(skip_policy,
                                                                    sort_keys=False))
    return out
