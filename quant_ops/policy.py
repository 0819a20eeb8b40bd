"""Quantization policy: which nodes to quantize, with which method and bit width.

Like torch.ao's QConfig mapping, but plain data (a dict, a JSON or a YAML file, never evaluated),
so an experiment is reproducible from its config.  Every mistake raises ``QuantOpsError`` naming
the offending key (and file): a silently ignored typo in a quantization config gives a model
that is quietly wrong, which costs far more than a loud error.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, NoReturn

import yaml

from .errors import QuantOpsError

#: method name -> the operator that implements it
METHODS: dict[str, str] = {"int8": "Quantization_int8", "pact": "PACT", "lsq": "LSQ",
                           "dorefa": "DoReFa", "fqn": "FQN", "gdrq": "GDRQ", "qil": "QIL",
                           "dsq": "DSQ"}
#: methods whose operators have not landed yet: named so asking for one says so, not "unknown"
PLANNED_METHODS: frozenset = frozenset()
METHOD_BITS: dict[str, tuple[int, int]] = {"int8": (2, 16), "pact": (2, 16), "lsq": (2, 16),
                                           "dorefa": (1, 16), "fqn": (2, 16), "gdrq": (1, 16),
                                           "qil": (2, 16), "dsq": (1, 16)}
#: which inputs a method can quantize, and whether it can have one scale per channel
METHOD_ROLES: dict[str, tuple[tuple[str, ...], bool]] = {
    "int8": (("weight", "activation"), True), "pact": (("activation",), False),
    "lsq": (("weight", "activation"), True), "dorefa": (("weight", "activation"), False),
    "fqn": (("weight", "activation"), True), "gdrq": (("weight", "activation"), False),
    "qil": (("weight", "activation"), False), "dsq": (("weight", "activation"), False)}
#: ops whose inputs may share one activation quantizer (TensorRT fuses them on one scale)
SHAREABLE_OPS = ("elemwise_add", "_Plus", "broadcast_add", "Concat", "Pooling")
DEFAULT_QUANTIZE_OPS = ("Convolution", "FullyConnected", "Deconvolution")

Fail = Callable[[str], NoReturn]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


#: per method: parameter -> (check, what it must be); mirrors the operator's own attribute checks
METHOD_PARAMS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {"int8": {
    "ema_decay": (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "delay_quant": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "grad_mode": (lambda v: isinstance(v, str) and v in ("ste", "clip"), "'ste' or 'clip'"),
    "fix_act_scale": (lambda v: isinstance(v, bool), "true or false"),
}, "pact": {
    "alpha": (lambda v: _is_num(v) and v > 0, "a number > 0 (the initial clip)"),
}, "lsq": {
    "signed": (lambda v: isinstance(v, bool), "true or false"),
    "init_range": (lambda v: _is_num(v) and v > 0,
                   "a number > 0 (activations: initial step = init_range / Qp)"),
}, "gdrq": {
    "group_size": (lambda v: v == -1,
                   "-1 (one group; grouped GDRQ is available on the operator, not yet in the "
                   "graph rewrite)"),
    "lamda": (lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "do_quant": (lambda v: isinstance(v, bool), "true or false"),
    "fix_alpha": (lambda v: isinstance(v, bool), "true or false"),
    "ktimes": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "grad_mode": (lambda v: isinstance(v, str) and v in ("ste", "clip"), "'ste' or 'clip'"),
}, "qil": {
    "fix_gamma": (lambda v: isinstance(v, bool), "true or false"),
    "init_range": (lambda v: _is_num(v) and v > 0,
                   "a number > 0 (activations: initial interval [0, init_range])"),
}, "dsq": {
    "soft": (lambda v: isinstance(v, bool), "true or false (false: the uniform baseline)"),
    "alpha": (lambda v: _is_num(v) and 0 < v < 0.5, "a number in (0, 0.5) (initial softness)"),
    "init_range": (lambda v: _is_num(v) and v > 0,
                   "a number > 0 (activations: initial range [0, init_range])"),
}, "dorefa": {}, "fqn": {
    "ema_decay": (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "grad_mode": (lambda v: isinstance(v, str) and v in ("ste", "clip"), "'ste' or 'clip'"),
}}
#: parameters that set a learned input's initial value rather than an operator attribute
INIT_PARAMS = {"alpha", "init_range"}
_SPEC_KEYS = ("method", "bits", "per_channel", "params")
_TOP_KEYS = ("preset", "weight", "activation", "quantize_ops", "shared_inputs", "skip", "overrides")
_SKIP_KEYS = ("names", "ops", "first_layer", "last_layer")
_OVERRIDE_KEYS = ("match", "weight", "activation")


def _raiser(source: str) -> Fail:
    def fail(msg: str) -> NoReturn:
        raise QuantOpsError(f"{source}: {msg}")
    return fail


def _no_unknown(d: Mapping, known: Iterable[str], path: str, fail: Fail) -> None:
    known = sorted(known)
    for k in d:
        if k not in known:
            fail(f"unknown key '{path + '.' if path else ''}{k}' (known: {', '.join(known)})")


def _mapping(v: Any, path: str, fail: Fail) -> Mapping:
    if not isinstance(v, Mapping):
        fail(f"{path} must be a mapping, got {v!r}")
    return v


def _check_spec(method: Any, bits: Any, per_channel: Any, params: Any, path: str, fail: Fail) -> None:
    if isinstance(method, str) and method in PLANNED_METHODS:
        fail(f"{path}.method: method '{method}' is not available yet (its operator has not landed)")
    if not isinstance(method, str) or method not in METHODS:
        fail(f"{path}.method = {method!r} is unknown (known: {', '.join(sorted(METHODS))})")
    lo, hi = METHOD_BITS[method]
    if not _is_int(bits):
        fail(f"{path}.bits must be an integer, got {bits!r}")
    if not lo <= bits <= hi:
        fail(f"{path}.bits = {bits} is out of range [{lo}, {hi}]")
    if not isinstance(per_channel, bool):
        fail(f"{path}.per_channel must be true or false, got {per_channel!r}")
    roles, channels_ok = METHOD_ROLES[method]
    role = {"weight": "weight", "activation": "activation"}.get(path.rsplit(".", 1)[-1])
    if role is not None and role not in roles:
        fail(f"{path}.method: '{method}' quantizes {' and '.join(roles)}s only, not {role}s")
    if per_channel and not channels_ok:
        fail(f"{path}.per_channel: '{method}' has one scale per tensor")
    known = METHOD_PARAMS[method]
    _no_unknown(_mapping(params, f"{path}.params", fail), known, f"{path}.params", fail)
    for k, v in params.items():
        check, what = known[k]
        if not check(v):
            fail(f"{path}.params.{k} = {v!r} must be {what}")


def _attr(v: Any) -> str:
    return ("True" if v else "False") if isinstance(v, bool) else str(v)


@dataclass(frozen=True)
class QuantSpec:
    """How one input (a weight or an activation) is quantized; immutable so presets stay shared."""
    method: str = "int8"
    bits: int = 8
    per_channel: bool = False
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _check_spec(self.method, self.bits, self.per_channel, self.params, "spec", _raiser("QuantSpec"))
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    @property
    def op_name(self) -> str:
        return METHODS[self.method]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "bits": self.bits, "per_channel": self.per_channel,
                "params": dict(self.params)}

    def merged(self, partial: Mapping[str, Any], path: str = "spec", fail: Fail | None = None) -> QuantSpec:
        """This spec with a partial spec dict applied; ``params`` merge key by key (and start
        empty when the partial spec switches method)."""
        fail = fail or _raiser("QuantSpec")
        _no_unknown(_mapping(partial, path, fail), _SPEC_KEYS, path, fail)
        fields = {**self.to_dict(), **partial}
        # another method's parameters mean nothing to this one: they do not carry over
        base = self.params if fields["method"] == self.method else {}
        fields["params"] = {**base, **_mapping(partial.get("params", {}), f"{path}.params", fail)}
        _check_spec(**fields, path=path, fail=fail)
        return QuantSpec(**fields)

    def op_attrs(self, is_weight: bool, channel_axis: int = 0) -> dict[str, str]:
        """Attributes for the operator (``Quantization_int8``), all strings as MXNet wants them."""
        if self.per_channel and not is_weight:
            raise QuantOpsError("QuantSpec: per_channel is for weights only (an activation has one scale)")
        attrs = {"nbits": str(self.bits), "is_weight": _attr(is_weight)}
        if self.method in ("int8", "lsq"):
            attrs["is_weight_perchannel"] = _attr(self.per_channel)
        elif self.method == "fqn":
            attrs["is_perchannel"] = _attr(self.per_channel)
        if self.method == "pact":
            del attrs["is_weight"]
        if self.per_channel:
            if not _is_int(channel_axis) or channel_axis < 0:
                raise QuantOpsError(f"QuantSpec: channel_axis must be an integer >= 0, got {channel_axis!r}")
            attrs["channel_axis"] = str(channel_axis)
        attrs.update((k, _attr(v)) for k, v in self.params.items() if k not in INIT_PARAMS)
        return attrs


@dataclass(frozen=True)
class NodeRule:
    """What one node gets; None leaves that input in float."""
    weight: QuantSpec | None
    activation: QuantSpec | None


@dataclass(frozen=True)
class Override:
    """Exception for nodes matching ``pattern`` (fnmatch): partial spec dicts merged over the
    base ({} = unchanged), or None to keep that input in float."""
    pattern: str
    weight: Mapping[str, Any] | None = field(default_factory=dict, hash=False)
    activation: Mapping[str, Any] | None = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"match": self.pattern}
        for key in ("weight", "activation"):
            value = getattr(self, key)
            if value != {}:
                d[key] = copy.deepcopy(dict(value)) if value is not None else None
        return d


def _apply(current: QuantSpec | None, base: QuantSpec, partial: Mapping | None, path: str,
           fail: Fail) -> QuantSpec | None:
    # a partial spec after an earlier "keep float" override starts again from the base spec
    return None if partial is None else (current or base).merged(partial, path, fail)


@dataclass(frozen=True)
class QuantPolicy:
    """What to quantize in a graph and how.  Validated on construction, with errors in the
    vocabulary of the config file (``skip.names``, ``overrides[0].weight.bits``)."""
    weight: QuantSpec = field(default_factory=QuantSpec)
    activation: QuantSpec = field(default_factory=QuantSpec)
    quantize_ops: tuple[str, ...] = DEFAULT_QUANTIZE_OPS
    shared_inputs: tuple[str, ...] = ()
    skip_names: tuple[str, ...] = ()
    skip_ops: tuple[str, ...] = ()
    skip_first: bool = False
    skip_last: bool = False
    overrides: tuple[Override, ...] = ()
    preset: str | None = None
    source: str = field(default="<QuantPolicy>", compare=False, repr=False)  # named in errors

    def __post_init__(self) -> None:
        fail = _raiser(self.source)
        for key in ("weight", "activation"):
            if not isinstance(getattr(self, key), QuantSpec):
                fail(f"{key} must be a QuantSpec, got {getattr(self, key)!r}")
        for name, path in (("quantize_ops", "quantize_ops"), ("shared_inputs", "shared_inputs"),
                           ("skip_names", "skip.names"), ("skip_ops", "skip.ops")):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) \
                    or not all(isinstance(v, str) for v in value):
                fail(f"{path} must be a list of strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for path, ops in (("quantize_ops", self.quantize_ops), ("skip.ops", self.skip_ops)):
            for op in ops:
                if op not in DEFAULT_QUANTIZE_OPS:
                    fail(f"{path}: unknown op '{op}' (quantizable ops: "
                         f"{', '.join(DEFAULT_QUANTIZE_OPS)})")
        for op in self.shared_inputs:
            if op not in SHAREABLE_OPS:
                fail(f"shared_inputs: '{op}' cannot share input scales (allowed: {', '.join(SHAREABLE_OPS)})")
        for name, path in (("skip_first", "skip.first_layer"), ("skip_last", "skip.last_layer")):
            if not isinstance(getattr(self, name), bool):
                fail(f"{path} must be true or false, got {getattr(self, name)!r}")
        if self.preset is not None and not isinstance(self.preset, str):
            fail(f"preset must be a string, got {self.preset!r}")
        object.__setattr__(self, "overrides", tuple(self.overrides))
        activations = [("activation", self.activation)]
        for i, o in enumerate(self.overrides):
            if not isinstance(o, Override) or not isinstance(o.pattern, str):
                fail(f"overrides[{i}] must be an Override with a string pattern, got {o!r}")
            # merging over the base validates the partial specs
            _apply(None, self.weight, o.weight, f"overrides[{i}].weight", fail)
            path = f"overrides[{i}].activation"
            activations.append((path, _apply(None, self.activation, o.activation, path, fail)))
        for path, spec in activations:
            if spec is not None and spec.per_channel:
                fail(f"{path}.per_channel = true: per-channel scales are for weights only")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>") -> QuantPolicy:
        """Policy from plain data: an optional ``preset`` as the base, other keys override it."""
        fail = _raiser(source)
        if not isinstance(d, Mapping):
            fail(f"the top level must be a mapping, got {'nothing' if d is None else type(d).__name__}")
        _no_unknown(d, _TOP_KEYS, "", fail)
        base = _preset(d["preset"], "preset", fail) if "preset" in d else cls()
        skip = _mapping(d.get("skip", {}), "skip", fail)
        _no_unknown(skip, _SKIP_KEYS, "skip", fail)
        overrides = d.get("overrides", [])
        if not isinstance(overrides, list):
            fail(f"overrides must be a list, got {overrides!r}")
        parsed = []
        for i, o in enumerate(overrides):
            path = f"overrides[{i}]"
            _no_unknown(_mapping(o, path, fail), _OVERRIDE_KEYS, path, fail)
            if "match" not in o:
                fail(f"{path}.match is required")
            parsed.append(Override(o["match"], o.get("weight", {}), o.get("activation", {})))
        return cls(weight=base.weight.merged(d.get("weight", {}), "weight", fail),
                   activation=base.activation.merged(d.get("activation", {}), "activation", fail),
                   quantize_ops=d.get("quantize_ops", base.quantize_ops),
                   shared_inputs=d.get("shared_inputs", base.shared_inputs),
                   skip_names=skip.get("names", base.skip_names), skip_ops=skip.get("ops", base.skip_ops),
                   skip_first=skip.get("first_layer", base.skip_first),
                   skip_last=skip.get("last_layer", base.skip_last),
                   overrides=tuple(parsed) if "overrides" in d else base.overrides,
                   preset=base.preset, source=source)

    @classmethod
    def load(cls, path: str | Path) -> QuantPolicy:
        """Policy from a .json, .yaml or .yml file (YAML through safe_load: data only)."""
        path = Path(path)
        fail = _raiser(str(path))
        suffix = path.suffix.lower()
        if suffix not in (".json", ".yaml", ".yml"):
            fail(f"unsupported file type '{suffix}' (use .json, .yaml or .yml)")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read the file: {e}")
        try:
            data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as e:
            fail(f"malformed {'JSON' if suffix == '.json' else 'YAML'}: {e}")
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON/YAML-ready) that ``from_dict`` turns back into an equal policy."""
        d: dict[str, Any] = {"preset": self.preset} if self.preset is not None else {}
        d.update(weight=self.weight.to_dict(), activation=self.activation.to_dict(),
                 quantize_ops=list(self.quantize_ops), shared_inputs=list(self.shared_inputs),
                 skip={"names": list(self.skip_names), "ops": list(self.skip_ops),
                       "first_layer": self.skip_first, "last_layer": self.skip_last},
                 overrides=[o.to_dict() for o in self.overrides])
        return d

    def skipped(self, node_name: str) -> bool:
        """The node is named by a skip pattern."""
        return any(fnmatchcase(node_name, p) for p in self.skip_names)

    def rule_for(self, node_name: str, op: str, is_first: bool = False,
                 is_last: bool = False) -> NodeRule | None:
        """The node's rule, or None when it stays float (not a quantized op, skipped, or
        overridden to float on both inputs).  Overrides apply in order; later ones win."""
        if (op not in self.quantize_ops or op in self.skip_ops or (is_first and self.skip_first)
                or (is_last and self.skip_last) or self.skipped(node_name)):
            return None
        fail = _raiser(self.source)
        weight, activation = self.weight, self.activation
        for i, o in enumerate(self.overrides):
            if fnmatchcase(node_name, o.pattern):
                weight = _apply(weight, self.weight, o.weight, f"overrides[{i}].weight", fail)
                activation = _apply(activation, self.activation, o.activation,
                                    f"overrides[{i}].activation", fail)
        return None if weight is None and activation is None else NodeRule(weight, activation)

    def check_patterns(self, node_names: Iterable[str]) -> None:
        """Fail on a pattern that matches no node: a name in the policy that is not in the
        graph is a typo or a stale config, never something to ignore."""
        names = list(node_names)
        patterns = [(p, f"skip.names[{i}]") for i, p in enumerate(self.skip_names)]
        patterns += [(o.pattern, f"overrides[{i}].match") for i, o in enumerate(self.overrides)]
        for pattern, path in patterns:
            if not any(fnmatchcase(n, pattern) for n in names):
                _raiser(self.source)(f"pattern '{pattern}' in {path} matches no node (of {len(names)})")


def _preset(name: Any, path: str, fail: Fail) -> QuantPolicy:
    if not isinstance(name, str) or name not in PRESETS:
        fail(f"{path}: unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})")
    return PRESETS[name]


# ``preset`` is both a field (the preset a policy came from) and, on the class, the lookup by
# name.  Set after @dataclass so the field's default stays None; an instance's value shadows it.
def _preset_by_name(cls: type[QuantPolicy], name: str) -> QuantPolicy:
    """The named preset (presets are immutable, so sharing them is safe)."""
    return _preset(name, "preset", _raiser("QuantPolicy.preset"))


QuantPolicy.preset = classmethod(_preset_by_name)  # type: ignore[assignment,method-assign]

_TRT_INT8 = QuantPolicy(weight=QuantSpec("int8", 8, per_channel=True),
                        activation=QuantSpec("int8", 8, params={"ema_decay": 0.99}), preset="trt_int8")
PRESETS: dict[str, QuantPolicy] = {
    "trt_int8": _TRT_INT8,
    # TensorRT fuses residual adds and concats and needs their inputs on one scale
    "trt_int8_shared": QuantPolicy(weight=_TRT_INT8.weight, activation=_TRT_INT8.activation,
                                   shared_inputs=("elemwise_add", "_Plus", "broadcast_add", "Concat"),
                                   preset="trt_int8_shared"),
}
