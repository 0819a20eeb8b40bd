"""FQN (Li et al. CVPR 2019): asymmetric [min, max] ranges kept by EMA (per channel for
weights), for detection networks; BN freezing and activation clipping are its recipe.

Seed import (``from_seed``).  The seed's ``_contrib_FQN(data, nbits=4, is_perchannel=False)``
(aux states ``min``, ``max``) and its prototype ``FQN_PY(nbits, is_perchannel=False)`` computed
``round((x - min) / s) * s + min`` with ``s = (max - min) / (2^n - 1)``: a grid that starts at
``min`` (no zero point) and is not saturated.  That is this operator's ``seed_grid=True``
(quant_ops/refs/fqn.py), and the node becomes

    FQN(seed_grid=True, nbits=n, grad_mode="ste", is_weight=..., is_perchannel=...)

* ``nbits``: the seed's ``n`` gave ``2^n - 1`` steps from min to max, as ours does: the same
  ``n`` (1..16; 1 bit, the two levels min and max, exists only with the seed grid).
* ``is_perchannel=True``: per channel along axis 0, as the seed (also on a Deconvolution
  weight; FQN has no deployment form that would want axis 1), with ``is_weight=True`` (per
  channel needs it here; with the seed grid a weight's range follows the seed's rule, so the
  values are the same on whatever tensor the seed put it).  Per tensor: ``is_weight`` where the
  quantizer feeds a layer's weight input, else an activation quantizer (``ema_decay`` 0: each
  training batch's min and max, as the seed).
* ``min`` / ``max`` keep their variables and stored values as ``fqn_min`` / ``fqn_max`` (one
  value, or one per channel; finite; a checkpoint given with the graph must hold them), and a
  ``qstate`` is added (zeros: step 0, inference, where every range is the stored one).
* ``grad_mode="ste"``: the seed's backward passed the gradient through everywhere.

Kept as documented differences (logged as a note): rounding half to even (the seed: half away
from zero; only exact ties differ), ``s`` divided by ``L`` (``FQN_PY`` divided; the C++ seed
multiplied by ``float(1 / L)``: an ulp in the step), NaN ignored by the batch range, and a
stored range with ``min == max`` gives +0 (the seed: NaN; warned).  Refused, naming the node:
attribute values the seed would not have run (``FQN_PY`` without ``nbits``, an unknown
attribute) or nbits outside 1..16, and, when a checkpoint is given, a ``min`` / ``max`` it
lacks, of another size than the seed kept, or not finite.
"""
from __future__ import annotations

import numpy as np

from .base import Input, Method, Param, SeedMapped, SeedNode, SeedState, choice, f32, is_num

SEED_DEFAULTS = {"nbits": "4", "is_perchannel": "False"}   # the seed's FQNPara
SEED_BITS = (1, 16)          # our nbits with seed_grid=True (the seed's n, unchanged)


class _FQN(Method):
    def from_range(self, attrs, amax, signed):
        return {"fqn_min": np.array([-amax if signed else 0.0], f32),
                "fqn_max": np.array([amax], f32)}

    # -- import from the seed toolkit -------------------------------------------------
    def from_seed(self, node: SeedNode) -> SeedMapped:
        if node.custom and "nbits" not in node.attrs:
            node.fail("attribute 'nbits' is missing: FQN_PY has no default for it")
        a = node.known(SEED_DEFAULTS)
        bits = node.bits("nbits", a["nbits"], 0, SEED_BITS)
        perchannel = node.as_bool("is_perchannel", a["is_perchannel"])
        is_weight = perchannel or bool(node.weight_axes)
        channels: int | None = 1
        if perchannel:
            shape = node.data_shape
            channels = shape[0] if shape and shape[0] > 0 else None
            if not node.weight_axes:
                node.note("per-channel ranges on a tensor that is not a layer's weight: kept "
                          "along axis 0, as the seed, with is_weight=True (the seed grid's "
                          "range rule is the same for weights and activations)")
        mn = node.stored(0, channels, "range minimum 'min'")
        mx = node.stored(1, channels, "range maximum 'max'")
        if mn is not None and mx is not None:
            if mn.size != mx.size:
                node.fail(f"its range minimum '{node.inputs[0].name}' has {mn.size} values and "
                          f"its maximum '{node.inputs[1].name}' {mx.size}")
            if channels is None:
                channels = mn.size
            flat = np.flatnonzero(mn == mx)
            if flat.size:
                node.warn(f"its stored range has min == max ({float(mn[flat[0]])}"
                          f"{f' in channel {flat[0]}' if perchannel else ''}): the seed's "
                          "output there was NaN (0 / 0), here it is +0")
        shape = (channels,) if channels is not None else (0,)   # (0,): inferred by the op
        node.note(f"seed grid (no zero point, no clamp): FQN seed_grid=True, nbits={bits}; "
                  "rounding half to even (the seed: half away from zero)"
                  + ("" if node.custom else
                     ", step (max - min) / L (the seed's C++: (max - min) * float(1 / L))"))
        attrs = {"nbits": str(bits), "is_weight": str(is_weight),
                 "is_perchannel": str(perchannel), "seed_grid": "True", "grad_mode": "ste"}
        return SeedMapped(attrs, {
            "fqn_min": SeedState(seed=0, shape=shape),
            "fqn_max": SeedState(seed=1, shape=shape),
            "qstate": SeedState(shape=(2,), value=np.zeros(2, np.float32))})


METHOD = _FQN(
    # activations: an EMA of the batch ranges from the calibrated start (the operator's own
    # default, 0, takes each batch's min/max: at 2-3 bits, with BN frozen, a feedback loop
    # grows them); weights keep their own range every step
    defaults={"activation": {"ema_decay": 0.99}},
    name="fqn", op="FQN",
    inputs=(Input("fqn_min", "state", "channels", "(0,)"),
            Input("fqn_max", "state", "channels", "(0,)"),
            Input("qstate", "state", 2, "(2,)")),
    bits=(2, 16), per_channel=True, channel_attr="is_perchannel",
    params={"ema_decay": Param(lambda v: is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
            "grad_mode": choice("ste", "clip")},
    sign_aware=True,
    seed_ops={"_contrib_FQN": ("data", "min", "max"), "Custom:FQN_PY": ("data", "min", "max")},
    qdq_reason="its levels are not an integer grid with zero point 0 (asymmetric range)",
    doc="EMA min/max ranges, per-channel weights")
