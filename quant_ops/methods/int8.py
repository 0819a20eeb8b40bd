"""INT8 QAT, TensorRT-aligned (Jacob et al. 2017): symmetric, zero point 0, EMA activation
ranges, per-channel weights with narrow range, delayed start.  The deployment format.

``signed: false`` (activations): codes 0..2^b - 1 with scale amax / (2^b - 1) on tensors that
are never negative (after a ReLU): the uint8 that oneDNN and onnxruntime run on CPUs, with
twice TensorRT's resolution there; a tensor that can be negative keeps the signed form.

``fix_weight_scale: true`` (weights): the stored range is a clip that stays, not max|w| at
every forward.  A training policy (``QuantPolicy.for_training``) sets it below 8 bits and the
range starts at the least-error clip on the layer's grid; deployment reads the stored clip.
Below 8 bits a training policy also gives activations ``grad_mode: clip``.

Seed import (``from_seed``; the graph side is quant_ops/graph/seed.py).

What the seed's ``_contrib_Quantization_int8`` was (its ``Quantization_int8Para``):

========================  ==========  ====================================================
attribute                 default     meaning in the seed
========================  ==========  ====================================================
``nbits``                 8           ``QUANT_LEVEL = 2^nbits - 1`` levels each side of 0
                                      (its int8 preset used ``nbits=7``)
``quant_mode``            "minmax"    only "minmax" ran (anything else: LOG(FATAL))
``is_weight``             True        weight: range = max|w| (per output channel, axis 0)
``is_weight_perchannel``  False       weights only
``delay_quant``           0           training forwards that pass the float value through
``ema_decay``             0.99        activation range EMA
``grad_mode``             "ste"       "ste" or "clip" (activations; weights always STE)
``fix_act_scale``         False       do not update the stored range in training
========================  ==========  ====================================================

Inputs: ``data`` (argument) and ``minmax`` (auxiliary state, the range ``amax`` itself:
shape ``(1,)``, or ``(w.shape[0],)`` for per-channel weights).  No ``[min, max]`` pairs, so
stored ranges carry over as they are.

The mapping to ``Quantization_int8``:

* ``nbits``: the seed's step was ``amax / (2^n - 1)``; ours is ``amax / (2^(b-1) - 1)``, so
  seed ``n`` becomes ``b = n + 1`` (seed 7 -> 8: the same 127 levels of TensorRT INT8).
* a third input ``qstate`` (``<quantizer>_qstate``, zeros: step 0, inference) is added; the
  seed kept its delay counter in the operator object, so it restarts at 0.
* the weight of a Deconvolution gets ``channel_axis=1`` (its output channels; the seed
  quantized per axis 0 there, which TensorRT does not do): its stored per-channel range is
  re-made for the new axis.
* left as they are, because they are what a TensorRT-aligned quantizer is: activations
  saturate at ``-qmax-1`` (the seed clipped at ``-amax``), rounding is half to even (the
  seed rounded half away from zero), a weight's range is its current ``max|w|`` also in
  inference (the seed used the stored one, i.e. the range of the last training step).

The prototype ``Quantization_int8_PY`` takes the same attributes (and ``bias_correct``,
refused when True).  ``QUANT_STE_PY(nbits=8)`` rounded ``x / s`` with ``s = max|x| /
(2^(n-1) - 1)`` of the whole tensor at every forward: on a weight that is this operator at
``nbits=n`` (per tensor; new ``minmax`` = max|w| and ``qstate``), on an activation it is
refused (its range followed every batch, also in inference).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import reference as ref
from ..calib.weights import int_grid, mse_clip
from .base import (QDQ, Input, Method, Param, SeedMapped, SeedNode, SeedState, boolean, choice,
                   f32, flag, is_int, is_num)

# the seed's defaults for _contrib_Quantization_int8 (its Quantization_int8Para)
SEED_DEFAULTS = {
    "nbits": "8", "quant_mode": "minmax", "is_weight": "True",
    "is_weight_perchannel": "False", "delay_quant": "0", "ema_decay": "0.99",
    "grad_mode": "ste", "fix_act_scale": "False",
}
SEED_NBITS_OFFSET = 1          # ours = seed + 1: both give 2^seed - 1 levels each side
OUR_NBITS = (2, 16)
OUR_MAX_DELAY = 1 << 40


class _Int8(Method):
    def op_attrs(self, bits, per_channel, params, is_weight, channel_axis=0):
        # below 8 bits a calibrated activation clip (MSE at the layer's width) sits well
        # under the batch max; the EMA of the max would walk it back out in training, so
        # the range stays where calibration put it unless the policy says otherwise
        if not is_weight and bits < 8:
            params = {"fix_act_scale": True, **params}
        return super().op_attrs(bits, per_channel, params, is_weight, channel_axis)

    def training_params(self, bits, is_weight):
        if bits >= 8:
            return {}
        if is_weight:
            # a max-scaled grid spends its few levels on the outliers (at 2 bits every weight
            # under max/2 becomes 0): fine-tuning keeps the least-error clip
            return {"fix_weight_scale": True}
        # the clip is fixed (fix_act_scale): a straight-through gradient beyond it pushes
        # values it cannot represent (ResNet-20 2/2 on 60k images: 57.2% with ste, 92.0%)
        return {"grad_mode": "clip"}

    def initial(self, bits, per_channel, params, is_weight, channels, weight, axis):
        init = super().initial(bits, per_channel, params, is_weight, channels, weight, axis)
        if is_weight and weight is not None and params.get("fix_weight_scale"):
            qmax = 2 ** (bits - 1) - 1        # narrow range: codes -qmax..qmax
            clip = mse_clip(np.asarray(weight, f32), int_grid(-qmax, qmax),
                            axis if per_channel else None)
            init["minmax"] = np.asarray(clip, f32).reshape(channels)
        return init

    def follows_weight(self, attrs):
        return not flag(attrs, "fix_weight_scale", False)

    def unsigned(self, attrs):
        return not flag(attrs, "is_weight") and not flag(attrs, "signed", True)

    def signed_params(self, params):
        return {**params, "signed": True}

    def from_range(self, attrs, amax, signed):
        return {"minmax": np.array([amax], f32)}

    def qdq(self, attrs, value):
        per_axis = self.per_axis(attrs)
        signed = not self.unsigned(attrs)
        scale = ref.scale_of(np.asarray(value, f32).reshape(-1), self.nbits(attrs), signed)
        return QDQ(scale if per_axis else scale[:1].reshape(()), signed, per_axis)

    def deploy_state(self, attrs, weight):
        if not self.follows_weight(attrs):   # the stored clip is the state
            return {}
        axis = int(attrs.get("channel_axis", "0")) if self.per_axis(attrs) else None
        return {"minmax": ref.abs_max(np.asarray(weight), axis)}

    def deploy_weight(self, attrs, weight, state):
        if self.follows_weight(attrs) or "minmax" not in state:
            return weight
        # a stored clip under max|w|: the engine's QuantizeLinear would give the weights
        # beyond it code -qmax-1 where the narrow-range operator gives -qmax
        mm = np.asarray(state["minmax"], f32).reshape(-1)
        axis = int(attrs.get("channel_axis", "0")) if self.per_axis(attrs) else None
        bound = mm[0] if axis is None else ref._broadcast(mm, np.ndim(weight), axis)
        return np.clip(weight, -bound, bound).astype(weight.dtype, copy=False)

    def fixed(self, x, attrs, state):
        import mxnet as mx

        kw = {k: v for k, v in attrs.items() if not k.startswith("__")}
        mm = np.asarray(state["minmax"], f32).reshape(-1)
        if not flag(attrs, "is_weight"):
            return super().fixed(x, attrs, {**state, "qstate": np.zeros(2, f32)})
        # a weight with its recorded ranges: the range is given, not recomputed
        kw["is_weight"] = "False"
        kw.pop("is_weight_perchannel", None)
        kw.pop("fix_weight_scale", None)
        axis = int(kw.pop("channel_axis", 0))

        def run(xc: np.ndarray, m: np.ndarray) -> np.ndarray:
            return mx.nd.Quantization_int8(mx.nd.array(xc), mx.nd.array(m), mx.nd.zeros(2),
                                           **kw).asnumpy()

        if mm.size == 1:
            return run(x, mm)
        xs = np.moveaxis(x, axis, 0)
        return np.moveaxis(np.stack([run(xs[c], mm[c:c + 1]) for c in range(mm.size)]), 0,
                           axis)

    # -- import from the seed toolkit (see quant_ops/graph/seed.py for the table) ---------
    def from_seed(self, node: SeedNode) -> SeedMapped:
        if node.key == "Custom:QUANT_STE_PY":
            return _from_quant_ste(node)
        attrs = _seed_attrs(node)
        is_weight = attrs["is_weight"] == "True"
        perchannel = attrs["is_weight_perchannel"] == "True"
        need = node.weight_axes
        if len(need) > 1 and perchannel:
            node.fail("feeds both a Deconvolution weight (channel axis 1) and another "
                      "layer's weight (axis 0); one per-channel range cannot serve both")
        axis = 1 if 1 in need else 0
        if axis == 1:
            attrs["channel_axis"] = "1"
            if perchannel:
                node.note("Deconvolution weight: per-channel ranges along axis 1 (output "
                          "channels, as TensorRT); the seed used axis 0")
        qstate = SeedState(shape=(2,), value=np.zeros(2, np.float32))
        mm = node.inputs[0]
        if not mm.is_var:
            return SeedMapped(attrs, {"minmax": SeedState(seed=0), "qstate": qstate})
        channels = 1
        w = None
        if perchannel:
            channels = None
            w = node.data_value if node.data_is_var else None
            wshape = node.data_shape if node.data_is_var else None
            if wshape and len(wshape) > axis and wshape[axis] > 0:
                channels = wshape[axis]
        stored = mm.value
        new = None
        if stored is not None:
            shape = tuple(stored.shape)
            if channels is not None and stored.size != channels:
                if not is_weight:
                    node.fail(f"its stored range '{mm.name}' has shape {shape}; an "
                              "activation range has one value")
                # a weight's range is re-computed from max|w| at every forward: re-make it
                if w is not None:
                    red = tuple(d for d in range(w.ndim) if d != axis)
                    new = np.abs(w.astype(np.float32)).max(axis=red).astype(np.float32)
                else:
                    new = np.zeros(channels, np.float32)
                node.note(f"stored range '{mm.name}' of shape {shape} re-made with shape "
                          f"({channels},)")
                shape = (channels,)
            elif channels is None and axis == 1:
                node.warn(f"the stored range '{mm.name}' has the seed's shape {shape} "
                          "(axis 0) and the weight's shape is unknown: drop it from the "
                          "params (the operator re-computes it from the weight)")
                shape = (0,)
            elif stored.ndim != 1:
                new = stored.astype(np.float32).reshape(-1)
                shape = (stored.size,)
        else:
            old = mm.shape
            if channels is not None:
                shape = (channels,)
            elif old is not None and len(old) == 1 and not (axis == 1 and perchannel):
                shape = old
            else:
                shape = (0,)  # rank known, size inferred by the operator
        return SeedMapped(attrs, {"minmax": SeedState(seed=0, shape=shape, value=new),
                                  "qstate": qstate})


def _seed_attrs(node: SeedNode) -> dict:
    """_contrib_Quantization_int8 / Quantization_int8_PY attributes -> ours."""
    a = dict(node.attrs)
    if node.custom:
        bc = a.pop("bias_correct", "False")
        if node.as_bool("bias_correct", bc):
            node.fail("attribute 'bias_correct' = True (the seed shifted each "
                      "channel's mean after rounding) is not supported")
    unknown = [k for k in a if k not in SEED_DEFAULTS and k not in ("workspace", "is_train")]
    if unknown:
        node.fail(f"attribute '{unknown[0]}' is not one of the seed operator's "
                  f"({', '.join(SEED_DEFAULTS)})")
    for k in ("workspace", "is_train"):
        if k in a:
            node.note(f"dropped attribute '{k}' = {a.pop(k)!r} (seed build only; "
                      "qstate[1] says training or inference)")
    v = {k: a.get(k, d) for k, d in SEED_DEFAULTS.items()}

    mode = v["quant_mode"].strip()
    if mode != "minmax":
        node.fail(f"attribute 'quant_mode' = {v['quant_mode']!r} is not supported "
                  "(only 'minmax': symmetric range max|x|)")
    if "quant_mode" in a:
        node.note("dropped attribute 'quant_mode' = 'minmax' (the only mode)")

    seed_bits = node.as_int("nbits", v["nbits"])
    bits = seed_bits + SEED_NBITS_OFFSET
    if not OUR_NBITS[0] <= bits <= OUR_NBITS[1]:
        lo, hi = (b - SEED_NBITS_OFFSET for b in OUR_NBITS)
        node.fail(f"attribute 'nbits' = {v['nbits']!r} is out of range: seed nbits "
                  f"{lo}..{hi} (2^nbits - 1 levels) convert, to quant_ops nbits "
                  f"{OUR_NBITS[0]}..{OUR_NBITS[1]}")
    if "nbits" not in a:
        node.note(f"no 'nbits': the seed default 8 ({2 ** 8 - 1} levels) is "
                  f"quant_ops nbits={bits}; a file from the simpledet build (127 "
                  "levels, no nbits) needs nbits=7 set")

    is_weight = node.as_bool("is_weight", v["is_weight"])
    perchannel = node.as_bool("is_weight_perchannel", v["is_weight_perchannel"])
    if perchannel and not is_weight:
        node.note("is_weight_perchannel=True on an activation: the seed ignored "
                  "it; set to False")
        perchannel = False

    delay = node.as_int("delay_quant", v["delay_quant"])
    if delay < 0:
        node.note(f"delay_quant = {delay}: the seed treated it as 0")
        delay = 0
    if delay > OUR_MAX_DELAY:
        node.fail(f"attribute 'delay_quant' = {v['delay_quant']!r} is out of range "
                  f"[0, {OUR_MAX_DELAY}]")

    ema = node.as_float("ema_decay", v["ema_decay"])
    if not 0.0 <= ema <= 1.0:
        node.fail(f"attribute 'ema_decay' = {v['ema_decay']!r} is outside [0, 1]")

    grad = v["grad_mode"].strip()
    if is_weight:
        if grad != "ste":
            node.note(f"grad_mode = {v['grad_mode']!r} on a weight: the seed passed "
                      "weight gradients straight through; set to 'ste'")
        grad = "ste"
    elif grad not in ("ste", "clip"):
        node.fail(f"attribute 'grad_mode' = {v['grad_mode']!r} is not 'ste' or "
                  "'clip'")

    fix = node.as_bool("fix_act_scale", v["fix_act_scale"])
    if fix and is_weight:
        node.fail("attribute 'fix_act_scale' = True on a weight (the seed then used "
                  "the stored range for the weight) is not supported: quant_ops "
                  "always takes a weight's range from max|w|")

    return {
        "nbits": str(bits),
        "is_weight": str(is_weight),
        "is_weight_perchannel": str(perchannel),
        "delay_quant": str(delay),
        "ema_decay": v["ema_decay"].strip(),
        "grad_mode": grad,
        "fix_act_scale": str(fix),
    }


def _from_quant_ste(node: SeedNode) -> SeedMapped:
    """The seed's prototype QUANT_STE_PY: y = round(x / s) * s with s = max|x| / (2^(n-1) - 1)
    over the whole tensor, every forward, gradient straight through.  That is this operator
    on a weight (range max|w| per tensor, recomputed every forward; the same levels at
    nbits = n).  On an activation (a range that follows each batch in inference) there is
    no exact mapping."""
    a = node.known({"nbits": "8"})
    bits = node.bits("nbits", a["nbits"], 0, OUR_NBITS)
    if not node.data_is_var:
        node.fail("QUANT_STE_PY on an activation takes each batch's own max|x| as the range, "
                  "also in inference; quant_ops' INT8 quantizer does that for weights only "
                  "(an activation keeps a calibrated range): no exact mapping")
    w = node.data_value
    amax = np.array([np.abs(w.astype(np.float32)).max() if w is not None and w.size else 0.0],
                    np.float32)
    attrs = {"nbits": str(bits), "is_weight": "True", "is_weight_perchannel": "False",
             "delay_quant": "0", "ema_decay": "0.99", "grad_mode": "ste",
             "fix_act_scale": "False"}
    return SeedMapped(attrs, {"minmax": SeedState(shape=(1,), value=amax),
                              "qstate": SeedState(shape=(2,), value=np.zeros(2, np.float32))})


def _delay(v: Any) -> bool:
    return is_int(v) and v >= 0


METHOD = _Int8(
    name="int8", op="Quantization_int8",
    inputs=(Input("minmax", "state", "channels", "(0,)"), Input("qstate", "state", 2, "(2,)")),
    bits=(2, 16), per_channel=True, default_bits=8, channel_attr="is_weight_perchannel",
    params={"ema_decay": Param(lambda v: is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
            "delay_quant": Param(_delay, "an integer >= 0"),
            "grad_mode": choice("ste", "clip"),
            "fix_act_scale": boolean(),
            "fix_weight_scale": Param(lambda v: isinstance(v, bool), "true or false",
                                      roles=("weight",)),
            "signed": Param(lambda v: isinstance(v, bool), "true or false", roles=("activation",))},
    range_input="minmax", linear=True, scale_follows_weight=True,
    seed_ops={"_contrib_Quantization_int8": ("data", "minmax"),
              "Custom:Quantization_int8_PY": ("data", "minmax"),
              "Custom:QUANT_STE_PY": ("data",)},
    doc="TensorRT INT8: symmetric, EMA activation ranges, per-channel weights")
