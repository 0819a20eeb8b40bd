"""Quantization policy: which nodes to quantize, with which method and bit width.

Like torch.ao's QConfig mapping, but plain data (a dict, a JSON or a YAML file, never evaluated),
so an experiment is reproducible from its config.  Every mistake raises ``QuantOpsError`` naming
the offending key (and file): a silently ignored typo in a quantization config gives a model
that is quietly wrong, which costs far more than a loud error.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from difflib import get_close_matches
from fnmatch import fnmatchcase
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, NoReturn

import numpy as np
import yaml

from . import methods
from .errors import QuantOpsError
from .methods.base import is_int

#: ops whose inputs may share one activation quantizer (TensorRT fuses them on one scale)
SHAREABLE_OPS = ("elemwise_add", "_Plus", "broadcast_add", "Concat", "Pooling")
DEFAULT_QUANTIZE_OPS = ("Convolution", "FullyConnected", "Deconvolution")

Fail = Callable[[str], NoReturn]
_SPEC_KEYS = ("method", "bits", "per_channel", "params")
_TOP_KEYS = ("preset", "weight", "activation", "quantize_ops", "shared_inputs", "skip", "overrides",
             "training")
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


def _plain(v: Any) -> Any:
    """``v`` with numpy scalars as Python ones (a policy built in code may hold them)."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_plain(x) for x in v)
    return v


def _check_spec(method: Any, bits: Any, per_channel: Any, params: Any, path: str, fail: Fail) -> None:
    if not isinstance(method, str) or method not in methods.REGISTRY:
        fail(f"{path}.method = {method!r} is unknown (known: {', '.join(sorted(methods.REGISTRY))})")
    m = methods.REGISTRY[method]
    lo, hi = m.bits
    if not is_int(bits):
        fail(f"{path}.bits must be an integer, got {bits!r}")
    if not lo <= bits <= hi:
        fail(f"{path}.bits = {bits} is out of range [{lo}, {hi}]")
    if not isinstance(per_channel, bool):
        fail(f"{path}.per_channel must be true or false, got {per_channel!r}")
    role = {"weight": "weight", "activation": "activation"}.get(path.rsplit(".", 1)[-1])
    if role is not None and role not in m.roles:
        fail(f"{path}.method: '{method}' quantizes {' and '.join(m.roles)}s only, not {role}s")
    if per_channel and not m.per_channel:
        fail(f"{path}.per_channel: '{method}' has one scale per tensor")
    _no_unknown(_mapping(params, f"{path}.params", fail), m.params, f"{path}.params", fail)
    for k, v in params.items():
        if not m.params[k].check(v):
            fail(f"{path}.params.{k} = {v!r} must be {m.params[k].what}")
        if role is not None and role not in m.params[k].roles:
            fail(f"{path}.params.{k}: '{method}' takes '{k}' for "
                 f"{' and '.join(m.params[k].roles)}s only, not {role}s")


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
    def descriptor(self) -> methods.Method:
        """The method's descriptor (operator, inputs, export form)."""
        return methods.REGISTRY[self.method]

    @property
    def op_name(self) -> str:
        return self.descriptor.op

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
        """Attributes for the method's operator, all strings as MXNet wants them."""
        if self.per_channel and not is_weight:
            raise QuantOpsError("QuantSpec: per_channel is for weights only (an activation has one scale)")
        if self.per_channel and (not is_int(channel_axis) or channel_axis < 0):
            raise QuantOpsError(f"QuantSpec: channel_axis must be an integer >= 0, got {channel_axis!r}")
        return self.descriptor.op_attrs(self.bits, self.per_channel, self.params, is_weight,
                                        channel_axis)

    def for_training(self, is_weight: bool) -> QuantSpec:
        """This spec with its method's fine-tuning params for the role and width under the
        ones it sets (``Method.training_params``)."""
        extra = self.descriptor.training_params(self.bits, is_weight)
        if not extra:
            return self
        return QuantSpec(self.method, self.bits, self.per_channel, {**extra, **self.params})

    def initial(self, is_weight: bool, channels: int, weight=None,
                channel_axis: int = 0) -> dict:
        """Starting value of each operator input after ``data`` (see ``Method.initial``)."""
        return self.descriptor.initial(self.bits, self.per_channel, self.params, is_weight,
                                       channels, weight, channel_axis)


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
    #: for fine-tuning: each spec takes its method's training params (``for_training``)
    training: bool = False
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
        if not isinstance(self.training, bool):
            fail(f"training must be true or false, got {self.training!r}")
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
        d = _plain(d)
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
                   preset=base.preset, training=d.get("training", base.training),
                   source=source)

    @classmethod
    def load(cls, path: str | Path) -> QuantPolicy:
        """Policy from a .json, .yaml or .yml file (YAML through safe_load: data only)."""
        if not isinstance(path, (str, Path)):
            raise QuantOpsError(f"a policy file is a path, not {type(path).__name__}")
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
            data = (json.loads(text, object_pairs_hook=_unique_json_keys) if suffix == ".json"
                    else yaml.load(text, Loader=_UniqueKeyLoader))
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
        if self.training:
            d["training"] = True
        return d

    def for_training(self) -> QuantPolicy:
        """This policy for fine-tuning: where a method trains better with other params than
        PTQ and deployment use (int8 weights below 8 bits keep a calibrated clip), they
        apply unless the policy sets them."""
        return dataclasses.replace(self, training=True)

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
        if weight is None and activation is None:
            return None
        if self.training:
            weight = weight and weight.for_training(True)
            activation = activation and activation.for_training(False)
        return NodeRule(weight, activation)

    def check_patterns(self, node_names: Iterable[str]) -> None:
        """Fail on a pattern that matches no node: a name in the policy that is not in the
        graph is a typo or a stale config, never something to ignore."""
        names = list(node_names)
        patterns = [(p, f"skip.names[{i}]") for i, p in enumerate(self.skip_names)]
        patterns += [(o.pattern, f"overrides[{i}].match") for i, o in enumerate(self.overrides)]
        for pattern, path in patterns:
            if not any(fnmatchcase(n, pattern) for n in names):
                near = get_close_matches(pattern.replace("*", "").replace("?", ""), names, 3, 0.5)
                hint = f"; nearest names: {', '.join(near)}" if near else ""
                _raiser(self.source)(f"pattern '{pattern}' in {path} matches no node "
                                     f"(of {len(names)}){hint}")


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
_SHARED = ("elemwise_add", "_Plus", "broadcast_add", "Concat")
PRESETS: dict[str, QuantPolicy] = {
    "trt_int8": _TRT_INT8,
    # TensorRT fuses residual adds and concats and needs their inputs on one scale
    "trt_int8_shared": QuantPolicy(weight=_TRT_INT8.weight, activation=_TRT_INT8.activation,
                                   shared_inputs=_SHARED, preset="trt_int8_shared"),
    # CPU engines (oneDNN in MXNet, onnxruntime): uint8 codes 0..255 on tensors that are
    # never negative, so a ReLU/ReLU6 folds into the layer before it (onnxruntime drops it
    # before a zero point of 0) and the grid there is twice as fine; int8 elsewhere
    "cpu_int8": QuantPolicy(weight=_TRT_INT8.weight,
                            activation=_TRT_INT8.activation.merged({"params": {"signed": False}},
                                                                   "activation"),
                            shared_inputs=_SHARED + ("Pooling",), preset="cpu_int8"),
}


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader (data only) that refuses a key given twice in one mapping: the
    first value would be dropped without a word."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _unique_json_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"key {twice[0]!r} appears twice in one object")
    return dict(pairs)


def _load_presets() -> None:
    """The presets shipped as policy files (``presets.yaml``, data only)."""
    source = Path(__file__).with_name("presets.yaml")
    for name, d in yaml.load(source.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader).items():
        p = QuantPolicy.from_dict(d, f"{source}: {name}")
        PRESETS[name] = dataclasses.replace(p, preset=name)


_load_presets()
