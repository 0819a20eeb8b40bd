"""Progressive bit lowering: fine-tune at a wider grid first, then narrow it stage by stage
(e.g. 8 -> 4 -> 3 -> 2), each stage starting from the weights the previous one trained.

Low-bit training from a float net can stall when the first coarse grid moves the weights
too far at once (Zhuang et al., "Towards Effective Low-bitwidth Convolutional Neural
Networks", 2018, quantize progressively for this reason).  Each stage here is the ordinary
recipe at its widths: the float model with the stage's weights is quantized with the policy
at ``max(stage, policy)`` bits per role (overrides such as 8-bit first and last layers
kept), its ranges are calibrated again for the new grid, and it is fine-tuned; the float
weights and BatchNorm values it trained carry over to the next stage.  Off by default: at
the widths of ``docs/results.md`` the one-stage recipe already trains (see the QAT table).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from ..errors import QuantOpsError
from ..policy import QuantPolicy


def stage_widths(policy: QuantPolicy, widths: Sequence[int]) -> list[tuple[int, int]]:
    """(weight bits, activation bits) of each stage: each width in decreasing order, never
    below the policy's own for either role, ending at the policy's widths; stages that would
    repeat the one before are dropped."""
    try:
        ws = sorted({int(b) for b in widths}, reverse=True)
    except (TypeError, ValueError):
        raise QuantOpsError(f"progressive widths must be integers, got {widths!r}") from None
    if not ws or ws[-1] < 1:
        raise QuantOpsError(f"progressive widths must be integers >= 1, got {list(widths)!r}")
    final = (policy.weight.bits, policy.activation.bits)
    stages: list[tuple[int, int]] = []
    for b in ws + [min(final)]:
        s = (max(b, final[0]), max(b, final[1]))
        if not stages or stages[-1] != s:
            stages.append(s)
    return stages


def at_widths(policy: QuantPolicy, weight_bits: int, act_bits: int) -> QuantPolicy:
    """``policy`` with its base weight and activation widths replaced (overrides, which
    name their own widths, unchanged)."""
    return dataclasses.replace(
        policy, weight=dataclasses.replace(policy.weight, bits=weight_bits),
        activation=dataclasses.replace(policy.activation, bits=act_bits))


def fit_progressive(float_model, policy: QuantPolicy, widths: Sequence[int],
                    run_stage: Callable, fold_bn: str | None = None):
    """Fine-tune ``float_model`` (a float ``QuantizedModel``, not modified) stage by stage:
    ``run_stage(model, stage_policy, index, (w, a))`` calibrates and fits the quantized
    ``model`` of one stage in place and returns what it likes (its progress record);
    ``fold_bn``: as ``QuantizedModel.quantize``.  Returns (the last stage's quantized
    model, [each stage's result])."""
    if float_model.is_quantized:
        raise QuantOpsError(f"{float_model.name}: progressive fine-tuning starts from the "
                            "float model: quantize() at each stage is its job")
    current = float_model.copy()
    results, model = [], None
    for i, (w, a) in enumerate(stage_widths(policy, widths)):
        stage_policy = at_widths(policy, w, a).for_training()
        model = current.copy().quantize(stage_policy, fold_bn=fold_bn)
        results.append(run_stage(model, stage_policy, i, (w, a)))
        # the float values the stage trained (weights, biases, BatchNorm) start the next
        current.params.update({k: model.params[k] for k in current.params})
    return model, results
