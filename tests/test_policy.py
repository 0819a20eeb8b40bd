"""QuantPolicy: presets, loading from dict / JSON / YAML, overrides, skips, and errors that
name the offending key (and file)."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from quant_ops.errors import QuantOpsError
from quant_ops.policy import PRESETS, NodeRule, Override, QuantPolicy, QuantSpec

CONFIG = {
    "preset": "trt_int8",
    "weight": {"bits": 6},
    "activation": {"params": {"delay_quant": 100}},
    "skip": {"names": ["head*"], "first_layer": True},
    "overrides": [{"match": "stage1_*", "weight": {"bits": 4}},
                  {"match": "stage1_conv2", "activation": None}],
}


def raises(match: str):
    return pytest.raises(QuantOpsError, match=re.escape(match))


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


# -- presets ------------------------------------------------------------------------

def test_trt_int8_preset():
    p = QuantPolicy.preset("trt_int8")
    assert p.preset == "trt_int8"
    assert p.weight == QuantSpec("int8", 8, per_channel=True)
    assert p.activation == QuantSpec("int8", 8, per_channel=False, params={"ema_decay": 0.99})
    assert p.quantize_ops == ("Convolution", "FullyConnected", "Deconvolution")
    assert p.shared_inputs == () and p.skip_names == () and p.skip_ops == () and p.overrides == ()
    assert not p.skip_first and not p.skip_last
    assert p.weight.op_name == "Quantization_int8"


def test_trt_int8_shared_preset():
    p, base = QuantPolicy.preset("trt_int8_shared"), PRESETS["trt_int8"]
    assert p.shared_inputs == ("elemwise_add", "_Plus", "broadcast_add", "Concat")
    assert (p.weight, p.activation, p.quantize_ops) == (base.weight, base.activation, base.quantize_ops)


def test_cpu_int8_preset_has_unsigned_activations_only():
    p, base = QuantPolicy.preset("cpu_int8"), PRESETS["trt_int8"]
    assert p.weight == base.weight and p.activation.method == "int8"
    assert p.activation.params["signed"] is False
    assert p.shared_inputs == ("elemwise_add", "_Plus", "broadcast_add", "Concat", "Pooling")
    assert p.activation.descriptor.unsigned(p.activation.op_attrs(is_weight=False))
    with pytest.raises(QuantOpsError, match=r"weight.params.signed: 'int8' takes 'signed' "
                                            r"for activations only"):
        QuantPolicy.from_dict({"preset": "trt_int8", "weight": {"params": {"signed": False}}})


def test_presets_are_immutable():
    p = QuantPolicy.preset("trt_int8")
    with pytest.raises(TypeError):
        p.activation.params["ema_decay"] = 0.5
    QuantPolicy.from_dict({"preset": "trt_int8", "activation": {"params": {"ema_decay": 0.5}}})
    assert PRESETS["trt_int8"].activation.params["ema_decay"] == 0.99


def test_op_attrs():
    p = QuantPolicy.preset("trt_int8")
    assert p.weight.op_attrs(True, channel_axis=1) == {
        "nbits": "8", "is_weight": "True", "is_weight_perchannel": "True", "channel_axis": "1"}
    assert p.activation.op_attrs(False) == {
        "nbits": "8", "is_weight": "False", "is_weight_perchannel": "False", "ema_decay": "0.99"}
    spec = QuantSpec(bits=4, params={"fix_act_scale": True, "grad_mode": "clip", "delay_quant": 10})
    assert spec.op_attrs(False) == {"nbits": "4", "is_weight": "False", "is_weight_perchannel": "False",
                                    "fix_act_scale": "True", "grad_mode": "clip", "delay_quant": "10"}
    with raises("per_channel is for weights only"):
        p.weight.op_attrs(False)


def test_op_attrs_are_accepted_by_the_operator():
    import mxnet as mx
    import numpy as np
    p = QuantPolicy.preset("trt_int8")
    for spec, is_weight, shape in ((p.weight, True, (3,)), (p.activation, False, (1,))):
        x = mx.nd.array(np.arange(6, dtype=np.float32).reshape(3, 2))
        y = mx.nd.Quantization_int8(x, mx.nd.zeros(shape), mx.nd.zeros((2,)), **spec.op_attrs(is_weight))
        assert y.shape == (3, 2)


# -- loading ------------------------------------------------------------------------

def test_dict_json_yaml_give_equal_policies(tmp_path):
    from_dict = QuantPolicy.from_dict(CONFIG)
    from_json = QuantPolicy.load(write(tmp_path, "p.json", json.dumps(CONFIG)))
    from_yaml = QuantPolicy.load(write(tmp_path, "p.yaml", yaml.safe_dump(CONFIG)))
    from_yml = QuantPolicy.load(write(tmp_path, "p.yml", yaml.safe_dump(CONFIG)))
    assert from_dict == from_json == from_yaml == from_yml
    assert from_dict.weight == QuantSpec("int8", 6, per_channel=True)
    # params merge key by key over the preset's
    assert dict(from_dict.activation.params) == {"ema_decay": 0.99, "delay_quant": 100}
    assert from_dict.preset == "trt_int8"


def test_no_preset_uses_defaults():
    p = QuantPolicy.from_dict({})
    assert p.weight == p.activation == QuantSpec("int8", 8, False, {})
    assert p.preset is None and p.quantize_ops == ("Convolution", "FullyConnected", "Deconvolution")


def test_to_dict_round_trips(tmp_path):
    custom = {"skip": {"ops": ["Deconvolution"], "last_layer": True},
              "overrides": [{"match": "a*", "weight": None, "activation": {"bits": 7}}]}
    for p in (QuantPolicy.from_dict(CONFIG), QuantPolicy.preset("trt_int8_shared"),
              QuantPolicy.from_dict({}), QuantPolicy.from_dict(custom)):
        d = p.to_dict()
        assert QuantPolicy.from_dict(d) == p
        assert QuantPolicy.load(write(tmp_path, "rt.yaml", yaml.safe_dump(d))) == p
        assert json.loads(json.dumps(d)) == d


# -- rules --------------------------------------------------------------------------

def test_overrides():
    p = QuantPolicy.from_dict(CONFIG)
    base = NodeRule(QuantSpec("int8", 6, True), p.activation)
    assert p.rule_for("stage2_conv1", "Convolution", False, False) == base
    four = QuantSpec("int8", 4, True)
    assert p.rule_for("stage1_conv1", "Convolution", False, False) == NodeRule(four, p.activation)
    assert p.rule_for("stage1_conv2", "Convolution", False, False) == NodeRule(four, None)


def test_later_override_wins():
    p = QuantPolicy.from_dict({"preset": "trt_int8", "overrides": [
        {"match": "*", "weight": {"bits": 4}, "activation": None},
        {"match": "fc*", "weight": {"bits": 6}, "activation": {"bits": 7}},
        {"match": "fc2", "weight": None}]})
    assert p.rule_for("conv", "Convolution", False, False) == NodeRule(QuantSpec("int8", 4, True), None)
    act7 = QuantSpec("int8", 7, params={"ema_decay": 0.99})
    assert p.rule_for("fc1", "FullyConnected", False, False) == NodeRule(QuantSpec("int8", 6, True), act7)
    assert p.rule_for("fc2", "FullyConnected", False, False) == NodeRule(None, act7)


def test_both_inputs_float_means_no_rule():
    p = QuantPolicy.from_dict({"overrides": [{"match": "fc", "weight": None, "activation": None}]})
    assert p.rule_for("fc", "FullyConnected", False, False) is None


def test_skips():
    p = QuantPolicy.from_dict({"preset": "trt_int8", "skip": {
        "names": ["head*", "*_dw"], "ops": ["Deconvolution"], "first_layer": True, "last_layer": True}})
    assert p.rule_for("conv", "Convolution", False, False) is not None
    assert p.rule_for("relu", "Activation", False, False) is None          # not a quantized op
    assert p.rule_for("head_fc", "FullyConnected", False, False) is None    # name glob
    assert p.rule_for("b1_dw", "Convolution", False, False) is None         # name glob
    assert p.rule_for("up", "Deconvolution", False, False) is None          # skip.ops
    assert p.rule_for("conv0", "Convolution", True, False) is None          # first layer
    assert p.rule_for("fc", "FullyConnected", False, True) is None          # last layer
    q = QuantPolicy.preset("trt_int8")
    assert q.rule_for("conv0", "Convolution", True, True) is not None


def test_check_patterns():
    p = QuantPolicy.from_dict(CONFIG, source="policy.yaml")
    p.check_patterns(["conv0", "stage1_conv1", "stage1_conv2", "head_fc"])
    with raises("policy.yaml: pattern 'head*' in skip.names[0] matches no node"):
        p.check_patterns(["conv0", "stage1_conv1", "stage1_conv2"])
    q = QuantPolicy.from_dict({"overrides": [{"match": "stage9_*", "weight": {"bits": 4}}]})
    with raises("pattern 'stage9_*' in overrides[0].match matches no node"):
        q.check_patterns(["stage1_conv1"])


# -- errors -------------------------------------------------------------------------

@pytest.mark.parametrize("config, message", [
    ({"weigth": {}}, "policy.yaml: unknown key 'weigth' (known: activation, overrides, preset,"),
    ({"weight": {"bits": 17}}, "policy.yaml: weight.bits = 17 is out of range [2, 16]"),
    ({"weight": {"bits": 1}}, "weight.bits = 1 is out of range [2, 16]"),
    ({"weight": {"bits": "8"}}, "weight.bits must be an integer, got '8'"),
    ({"weight": {"bits": True}}, "weight.bits must be an integer"),
    ({"weight": {"bitz": 8}}, "unknown key 'weight.bitz' (known: bits, method, params, per_channel)"),
    ({"weight": 8}, "weight must be a mapping, got 8"),
    ({"activation": {"method": "bnn"}}, "activation.method = 'bnn' is unknown"),
    ({"weight": {"method": "fp8"}},
     "weight.method = 'fp8' is unknown (known: dorefa, dsq, fqn, gdrq, int8, lsq, pact, qil)"),
    ({"weight": {"method": "pact"}},
     "weight.method: 'pact' quantizes activations only, not weights"),
    ({"weight": {"method": "dorefa", "per_channel": True}},
     "weight.per_channel: 'dorefa' has one scale per tensor"),
    ({"weight": {"per_channel": "yes"}}, "weight.per_channel must be true or false"),
    ({"preset": "trt_int8", "activation": {"per_channel": True}},
     "activation.per_channel = true: per-channel scales are for weights only"),
    ({"weight": {"params": {"ema_decay": 1.0}}},
     "weight.params.ema_decay = 1.0 must be a number in [0, 1)"),
    ({"activation": {"params": {"delay_quant": -1}}},
     "activation.params.delay_quant = -1 must be an integer >= 0"),
    ({"activation": {"params": {"grad_mode": "sgd"}}},
     "activation.params.grad_mode = 'sgd' must be 'ste' or 'clip'"),
    ({"activation": {"params": {"fix_act_scale": 1}}},
     "activation.params.fix_act_scale = 1 must be true or false"),
    ({"activation": {"params": {"decay": 0.9}}},
     "unknown key 'activation.params.decay' (known: delay_quant,"),
    ({"activation": {"params": [1]}}, "activation.params must be a mapping"),
    ({"activation": {"params": {"fix_weight_scale": True}}},
     "activation.params.fix_weight_scale: 'int8' takes 'fix_weight_scale' for weights only"),
    ({"training": "yes"}, "training must be true or false, got 'yes'"),
    ({"preset": "trt_int9"}, "preset: unknown preset 'trt_int9' (known: cpu_int8, lsq_w2a2, "),
    ({"quantize_ops": "Convolution"}, "quantize_ops must be a list of strings, got 'Convolution'"),
    ({"shared_inputs": ["Add"]}, "shared_inputs: 'Add' cannot share input scales (allowed: elemwise_add,"),
    ({"skip": {"nmes": ["a"]}}, "unknown key 'skip.nmes' (known: first_layer, last_layer, names, ops)"),
    ({"skip": {"names": "a*"}}, "skip.names must be a list of strings"),
    ({"skip": {"ops": [1]}}, "skip.ops must be a list of strings"),
    ({"skip": {"first_layer": "no"}}, "skip.first_layer must be true or false"),
    ({"skip": ["a"]}, "skip must be a mapping"),
    ({"overrides": {"match": "a"}}, "overrides must be a list"),
    ({"overrides": ["a"]}, "overrides[0] must be a mapping"),
    ({"overrides": [{"weight": {"bits": 4}}]}, "overrides[0].match is required"),
    ({"overrides": [{"match": "a", "wieght": {}}]}, "unknown key 'overrides[0].wieght' (known: activation,"),
    ({"overrides": [{"match": 3}]}, "overrides[0] must be an Override with a string pattern"),
    ({"overrides": [{"match": "a"}, {"match": "b", "weight": {"bits": 32}}]},
     "overrides[1].weight.bits = 32 is out of range [2, 16]"),
    ({"overrides": [{"match": "a", "weight": {"method": "bnn"}}]},
     "overrides[0].weight.method = 'bnn' is unknown"),
    ({"overrides": [{"match": "a", "activation": {"per_channel": True}}]},
     "overrides[0].activation.per_channel = true: per-channel scales are for weights only"),
    ({"overrides": [{"match": "a", "activation": {"params": {"x": 1}}}]},
     "unknown key 'overrides[0].activation.params.x'"),
])
def test_errors_name_the_key(config, message):
    with raises(message):
        QuantPolicy.from_dict(config, source="policy.yaml")


def test_errors_name_the_file(tmp_path):
    path = write(tmp_path, "policy.yaml", "preset: trt_int8\nweight:\n  bits: 17\n")
    with raises(f"{path}: weight.bits = 17 is out of range [2, 16]"):
        QuantPolicy.load(path)
    path = write(tmp_path, "policy.json", json.dumps({"weigth": {}}))
    with raises(f"{path}: unknown key 'weigth'"):
        QuantPolicy.load(path)


def test_load_errors(tmp_path):
    bad_yaml = write(tmp_path, "bad.yaml", "weight: {bits: 8\n")
    with raises(f"{bad_yaml}: malformed YAML"):
        QuantPolicy.load(bad_yaml)
    bad_json = write(tmp_path, "bad.json", "{'weight': 1}")
    with raises(f"{bad_json}: malformed JSON"):
        QuantPolicy.load(bad_json)
    top_list = write(tmp_path, "list.yaml", "- preset: trt_int8\n")
    with raises(f"{top_list}: the top level must be a mapping, got list"):
        QuantPolicy.load(top_list)
    empty = write(tmp_path, "empty.yml", "")
    with raises(f"{empty}: the top level must be a mapping, got nothing"):
        QuantPolicy.load(empty)
    with raises(f"{tmp_path / 'missing.yaml'}: cannot read the file"):
        QuantPolicy.load(tmp_path / "missing.yaml")
    with raises("unsupported file type '.toml'"):
        QuantPolicy.load(write(tmp_path, "p.toml", "a = 1"))


def test_yaml_is_never_evaluated(tmp_path):
    path = write(tmp_path, "evil.yaml", "preset: !!python/object/apply:os.system ['echo pwned']\n")
    with raises(f"{path}: malformed YAML"):
        QuantPolicy.load(path)


def test_direct_construction_is_validated():
    spec = QuantSpec(bits=8, params={"ema_decay": 0.9})
    assert spec.merged({"bits": 4, "params": {"delay_quant": 5}}) == \
        QuantSpec(bits=4, params={"ema_decay": 0.9, "delay_quant": 5})
    with raises("QuantSpec: unknown key 'spec.nbits'"):
        spec.merged({"nbits": 4})
    with raises("unknown preset 'nope'"):
        QuantPolicy.preset("nope")
    with raises("QuantSpec: spec.bits = 20 is out of range [2, 16]"):
        QuantSpec(bits=20)
    with raises("QuantSpec: spec.method = 'bnn' is unknown"):
        QuantSpec("bnn")
    with raises("<QuantPolicy>: activation.per_channel = true"):
        QuantPolicy(activation=QuantSpec(per_channel=True))
    with raises("overrides[0].weight.bits = 40"):
        QuantPolicy(overrides=(Override("a", {"bits": 40}),))


def test_override_that_switches_method_drops_the_other_methods_params():
    from quant_ops.policy import QuantPolicy

    pol = QuantPolicy.from_dict({
        "activation": {"method": "lsq", "bits": 4, "params": {"signed": True}},
        "overrides": [{"match": "c1", "activation": {"method": "int8"}},
                      {"match": "c2", "activation": {"bits": 3}}]})
    assert pol.rule_for("c1", "Convolution").activation.params == {}
    assert pol.rule_for("c2", "Convolution").activation.params == {"signed": True}


def test_training_policy_gives_methods_their_fine_tuning_params():
    """``for_training``: int8 weights below 8 bits keep a calibrated clip and activations
    train with the clip gradient; 8-bit layers and an explicit setting are left alone; the
    flag round-trips."""
    p = QuantPolicy.from_dict({
        "preset": "trt_int8", "weight": {"bits": 4}, "activation": {"bits": 4},
        "overrides": [{"match": "first", "weight": {"bits": 8}, "activation": {"bits": 8}},
                      {"match": "pinned", "weight": {"params": {"fix_weight_scale": False}}},
                      {"match": "lsq", "weight": {"method": "lsq", "params": {}}}]})
    assert not p.training and p.rule_for("body", "Convolution").weight is p.weight
    t = p.for_training()
    assert t.training and t != p and not p.training
    body = t.rule_for("body", "Convolution")
    assert body.weight.params["fix_weight_scale"] is True
    assert "fix_weight_scale" in body.weight.op_attrs(is_weight=True)
    assert body.activation.params["grad_mode"] == "clip"     # below 8 bits, a fixed clip
    assert "grad_mode" not in t.rule_for("first", "Convolution").activation.params
    assert "fix_weight_scale" not in t.rule_for("first", "Convolution").weight.params
    assert t.rule_for("pinned", "Convolution").weight.params["fix_weight_scale"] is False
    assert "fix_weight_scale" not in t.rule_for("lsq", "Convolution").weight.params
    assert QuantPolicy.from_dict(t.to_dict()) == t and "training" not in p.to_dict()
    assert QuantPolicy.from_dict({"preset": "trt_int8", "training": True}).training
