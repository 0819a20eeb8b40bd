"""The fine-tuning recipe a policy gets by default: what a user who passes no tuning flags
should get, measured on the bundled models (docs/results.md).

* Starting point: a calibrated model, never empty ranges.  Activation ranges by the
  ``auto`` calibrator (per tensor, the candidate range least disturbing the layer that
  reads it, at the layer's bit width; MSE where no linear layer reads it); weight ranges
  start where each method's descriptor puts them (MSE on the method's grid).
* Learning rate: QAT fine-tunes a trained net.  At 8 bits the calibrated model is already
  within a few hundredths of a point of float and any real step only moves it away: the
  peak lr is float lr / 400.  Below 8 bits the grid is coarse and the weights must move:
  float lr / 20.  Both under the SineScheduler, for one epoch (the seed's schedule).
* BatchNorm: folded into the weights with frozen statistics (as deployed) where every
  weight method keeps the weight's scale (``Method.keeps_weight_scale``); kept after the
  layer where one does not (a method that maps weights to [-1, 1] or reshapes them: BN
  absorbs the new scale, as those papers train), its statistics then measured again on
  the calibration images with the quantized weights (``calib.bn_stats``).
* Quantizer parameters: each method's lr / wd multipliers (descriptor), projected into
  their domains after every step (``train.constraints``).
* Off by default, switched on by the caller: BatchNorm statistics frozen after a warm-up
  (``FitConfig.freeze_bn_after``) and progressive bit lowering (``train.progressive``).
* The policy: ``policy.for_training()``, each method's fine-tuning params under the ones the
  policy sets (``Method.training_params``: int8 weights below 8 bits keep the least-error
  clip instead of max|w|, which at 2 bits zeroes every weight under max/2; their activations
  take the clip gradient, as the clip itself stays fixed).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .. import methods
from ..policy import QuantPolicy

#: the float training lr assumed for a model that does not say (SGD on ImageNet/CIFAR CNNs)
DEFAULT_FLOAT_LR = 0.1


@dataclass(frozen=True)
class Recipe:
    lr: float                  #: peak learning rate (SineScheduler)
    epochs: int                #: passes over the training set
    calib_method: str          #: activation ranges before training
    calib_images: int          #: images they are calibrated on
    fold_bn: str | None        #: "qat" (folded, frozen statistics) or None (BN kept)
    batch_size: int = 128
    wd: float = 1e-4           #: weight decay (quantizer parameters: their method's multiplier)
    #: BatchNorm statistics measured again on the calibration images with the quantized
    #: weights (``calib.bn_stats``): where BN is kept because the weight method rescales
    bn_stats: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def lowest_bits(policy: QuantPolicy) -> int:
    """The smallest bit width the policy's body uses (overrides mostly raise the first and
    last layers, so the base weight and activation specs decide)."""
    return min(policy.weight.bits, policy.activation.bits)


def default_recipe(policy: QuantPolicy, float_lr: float | None = None) -> Recipe:
    """The recipe for ``policy`` on a net trained with ``float_lr`` (default 0.1)."""
    float_lr = DEFAULT_FLOAT_LR if float_lr is None else float(float_lr)
    eight = lowest_bits(policy) >= 8
    weight_methods = {policy.weight.method} | {o.weight.get("method", policy.weight.method)
                                               for o in policy.overrides if o.weight}
    fold = all(methods.get(m).keeps_weight_scale for m in weight_methods)
    return Recipe(lr=float_lr / (400 if eight else 20), epochs=1,
                  calib_method="auto", calib_images=512,
                  fold_bn="qat" if fold else None, bn_stats=not fold)


def calibrated_start(model, rec: Recipe, images, progress: bool = False):
    """The recipe's starting point for a quantized ``model``: activation ranges calibrated
    (``rec.calib_method`` on the first ``rec.calib_images`` of ``images``), then, with
    ``rec.bn_stats``, BatchNorm statistics measured again on the same images."""
    if rec.calib_images:
        x = images[:rec.calib_images]
        model.calibrate(x, rec.calib_method, batch_size=128, progress=progress)
        if rec.bn_stats:
            model.reestimate_bn(x)
    return model
