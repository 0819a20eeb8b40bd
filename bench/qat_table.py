"""QAT results table on Fashion-MNIST: the project's float ResNet-20 fine-tuned with each
method at W/A 8/8, 4/4, 3/4, 3/3, 2/2 (and the seed toolkit's mixed rows, INT8-grid or GDRQ
weights with PACT activations), beside the seed's published CIFAR-10 ResNet-20 numbers; the
bundled MobileNet-v2-style net (depthwise convolutions, ReLU6) with the same recipes at 4/4
(and INT8 at 8/8); plus the train-step time of the quantized net against the float net
(W8A8 per-channel, hybridized, ratio in one run).

Writes the QAT section of ``docs/results.md`` and ``bench/results/qat_table.json``.

    python bench/qat_table.py --resume             # the whole table, in as many runs as it takes
    python bench/qat_table.py --configs lsq:4/4,int8:8/8 --train-images 12800
    python bench/qat_table.py --resume --models mobilenetv2  # one model's rows only

Each row is the library's default recipe (``quant_ops.train.recipe``), nothing tuned per
row; its budget is one epoch over ``--train-images`` images (default: the whole training
set, about 4-5 minutes a row on 2 cores).  The JSON is written after every row; with
``--resume`` a later run keeps the rows measured with the same budget on the same code
(``code_version``: a hash of the sources in ``MEASURED``) and runs the others again.
The first convolution and the classifier stay INT8, as in the PACT, DoReFa and LSQ papers.
A layer that reads a tensor which can be negative (no ReLU before it) gets the row method's
signed form, or the signed int8 quantizer at the row's activation bits where the method has
none (DoReFa, QIL, DSQ, GDRQ and FQN activations represent [0, a] only).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402

import quant_ops  # noqa: E402,F401
from quant_ops.datasets import fashion_mnist  # noqa: E402
from quant_ops import methods  # noqa: E402
from quant_ops.fileio import atomic_write_text  # noqa: E402
from quant_ops.graph.sign import nonnegative  # noqa: E402
from quant_ops.model import QuantizedModel  # noqa: E402
from quant_ops.ops import set_training  # noqa: E402
from quant_ops.policy import QuantPolicy  # noqa: E402
from quant_ops.train import FitConfig, fit  # noqa: E402
from quant_ops.train.recipe import calibrated_start, default_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: table name -> the bundled checkpoint (examples/models/<name>)
MODELS = {"resnet20": "fmnist_resnet20", "mobilenetv2": "fmnist_mobilenetv2"}
#: table name -> (weight method, activation method); the seed's pairings included
METHODS = {"int8": ("int8", "int8"), "int8+pact": ("int8", "pact"), "gdrq+pact": ("gdrq", "pact"),
           "pact": ("dorefa", "pact"), "dorefa": ("dorefa", "dorefa"), "lsq": ("lsq", "lsq"),
           "qil": ("qil", "qil"), "dsq": ("dsq", "dsq"), "gdrq": ("gdrq", "gdrq"),
           "fqn": ("fqn", "fqn")}
PER_CHANNEL = {"int8", "lsq", "fqn"}
#: activation params per method: int8 takes the unsigned grid (codes 0..2^b-1, as oneDNN and
#: onnxruntime run after a ReLU) wherever the graph proves a tensor non-negative, its signed
#: form elsewhere; the signed grid would spend half its codes on values ReLU never produces
UNSIGNED = {"int8": {"signed": False}}
BITS = ["8/8", "4/4", "2/2", "3/3", "3/4"]
#: the rows of each model: (method, bits); MobileNet: every method at 4/4, INT8 at 8/8
ROWS = {"resnet20": [(m, b) for b in BITS for m in METHODS],
        "mobilenetv2": [("int8", "8/8")] + [(m, "4/4") for m in METHODS]}
#: the seed toolkit's published top-1 (README of XiaotaoChen/mx_quant_op): CIFAR-10
#: ResNet-20, fp32 0.920; columns: our method name it corresponds to
SEED_CIFAR10 = {"pact": {"4/4": 91.8, "3/4": 91.8, "3/3": 91.7, "2/2": 89.7},
                "int8": {"4/4": 91.4, "3/4": 91.1, "3/3": 89.1, "2/2": 67.0},
                "int8+pact": {"4/4": 91.9, "3/4": 91.7, "3/3": 91.6, "2/2": 89.3},
                "gdrq+pact": {"2/2": 90.3}}
SEED_FP32 = 92.0
#: what a row's activation method cannot do on this net, whatever the recipe
ACTIVATION_NOTES = {
    "dorefa": "the paper's quantizer clips to [0, 1] (it assumes a bounded activation); "
              "this ResNet's post-ReLU tensors reach about 10, so everything above 1 is "
              "lost at any width: the rows measure the method as published, not a fixable "
              "recipe gap (PACT is DoReFa's activation quantizer with a learned clip)"}


def load_float(model: str = "resnet20") -> tuple[QuantizedModel, dict]:
    path = ROOT / "examples" / "models" / MODELS[model]
    info = json.loads(path.with_suffix(".json").read_text())
    return QuantizedModel.load(path), info


def layers(model: QuantizedModel) -> tuple[list, list]:
    """([first conv, classifier], [layers whose input can be negative]) of a float net."""
    graph = model.graph
    nonneg = nonnegative(graph)
    quantized = [n for _, n in graph.ops() if n.op in ("Convolution", "FullyConnected")]
    signed = [n.name for n in quantized if tuple(n.inputs[0][:2]) not in nonneg]
    return [quantized[0].name, quantized[-1].name], signed


def policy(name: str, bits: str, first_last=(), signed_inputs=()) -> dict:
    w, a = METHODS[name]
    wb, ab = (int(b) for b in bits.split("/"))
    # a method with no signed form reads a signed tensor with the signed int8 quantizer
    no_signed_form = methods.get(a).signed_params({}) is None
    return {"weight": {"method": w, "bits": wb, "per_channel": w in PER_CHANNEL},
            "activation": {"method": a, "bits": ab, "params": UNSIGNED.get(a, {})},
            "overrides": [{"match": n, "activation": {"method": "int8", "bits": ab, "params": {}}}
                          for n in signed_inputs if no_signed_form and n not in first_last] +
                         [{"match": n, "weight": {"method": "int8", "bits": 8,
                                                  "per_channel": True, "params": {}},
                           "activation": {"method": "int8", "bits": 8, "params": {}}}
                          for n in first_last]}


#: what a row measures: the kernels and operator registrations, the method descriptors and
#: references, calibration, training, the rewrite passes and the model object (not the
#: command lines, file writing, export or error plumbing)
MEASURED = ("operator_cxx/kernels", "operator_cxx/*.cc", "quant_ops/methods", "quant_ops/refs",
            "quant_ops/calib", "quant_ops/train", "quant_ops/graph/quantize.py",
            "quant_ops/graph/fold_bn.py", "quant_ops/graph/sign.py",
            "quant_ops/graph/quantizers.py", "quant_ops/graph/runner.py", "quant_ops/model.py",
            "quant_ops/ops.py", "quant_ops/policy.py", "quant_ops/presets.yaml")
SKIP = ("error_channel.cc",)


def code_version(root: Path = ROOT) -> str:
    """SHA-256 of the code a row measures (``MEASURED``, comments and docstrings left out):
    a row measured on other code is stale and is run again, never kept."""
    from code_version import expand, hash_files

    return hash_files(expand(MEASURED, SKIP, root), root)


def step_time(net, x, y, steps=20) -> float:
    """Median seconds of one SGD step (forward, backward, update) on a fixed batch."""
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 1e-4})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    xb, yb = mx.nd.array(x), mx.nd.array(y)
    times = []
    for i in range(steps + 3):
        t = time.perf_counter()
        with autograd.record():
            loss = loss_fn(net(xb), yb)
        loss.backward()
        trainer.step(len(x))
        mx.nd.waitall()
        if i >= 3:
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def step_times() -> dict:
    """Train-step milliseconds of the float net and of W8A8 (BN folded, and BN kept), in
    one run so that their ratio holds on a noisy machine."""
    fnet = load_float()[0].to_block()
    fnet.hybridize(static_alloc=True)
    qnet = load_float()[0].quantize("trt_int8", fold_bn="qat").to_block()
    qnet.hybridize(static_alloc=True)
    unfolded = load_float()[0].quantize("trt_int8").to_block()   # BN kept as in the float net
    unfolded.hybridize(static_alloc=True)
    xtr, ytr = _data("resnet20", 128)[:2]
    xb, yb = xtr[:128], ytr[:128]
    return {"float": step_time(fnet, xb, yb) * 1e3, "w8a8": step_time(qnet, xb, yb) * 1e3,
            "w8a8_bn_unfolded": step_time(unfolded, xb, yb) * 1e3}


def run_config(model_name: str, name: str, bits: str, data: tuple, args) -> dict:
    """One row: the float checkpoint, the policy, then the library's default recipe
    (``quant_ops.train.recipe``, its training policy included) with nothing tuned for the
    row."""
    xtr, ytr, xte, yte = data
    model, info = load_float(model_name)
    first_last, signed = layers(model)
    pol = QuantPolicy.from_dict(policy(name, bits, first_last, signed),
                                f"{model_name} {name} {bits}")
    rec = default_recipe(pol, info["lr"])
    model.quantize(pol.for_training(), fold_bn=rec.fold_bn)
    calibrated_start(model, rec, xtr)
    acc0 = model.evaluate(xte, yte)
    q = model.to_block()
    q.hybridize(static_alloc=True)
    t = time.time()
    prog = fit(q, (xtr, ytr), None, FitConfig(epochs=rec.epochs, lr=rec.lr, wd=rec.wd,
                                              batch_size=rec.batch_size, seed=0,
                                              progress=False))
    set_training(q, False)
    acc = model.from_block(q).evaluate(xte, yte)
    loss = prog["history"][-1]["loss"] if prog["history"] else float("nan")
    return {"model": model_name, "method": name, "bits": bits, "weight": METHODS[name][0],
            "activation": METHODS[name][1], "fold_bn": rec.fold_bn or "no", "lr": rec.lr,
            "recipe": rec.to_dict(), "train_images": len(xtr), "steps": prog["step"],
            "signed_inputs": [n for n in signed if n not in first_last],
            "accuracy_before": acc0, "accuracy": acc, "train_loss": loss,
            "train_minutes": round((time.time() - t) / 60, 2), "code": code_version()}


TITLES = {"resnet20": "ResNet-20", "mobilenetv2": "MobileNet-v2-style (depthwise, ReLU6)"}


def _table(rows: list, acc_float: float, seed_column: bool, current: str) -> list:
    head = ("| method | W | A | W/A bits | BN folded | budget (images x epochs) | before (%) | "
            "after (%) | vs float |")
    lines = [head + (" seed CIFAR-10 (%) |" if seed_column else ""),
             "|---" * (10 if seed_column else 9) + "|"]
    for r in rows:
        seed = SEED_CIFAR10.get(r["method"], {}).get(r["bits"])
        stale = " (stale)" if r.get("code") != current else ""
        lines.append(f"| {r['method']}{stale} | {r['weight']} | {r['activation']} | {r['bits']} | "
                     f"{r.get('fold_bn', 'qat')} | "
                     f"{r.get('train_images', '?')} x {r.get('recipe', {}).get('epochs', 1)} | "
                     f"{r['accuracy_before']:.2f} | {r['accuracy']:.2f} | "
                     f"{r['accuracy'] - acc_float:+.2f} |"
                     + (f" {'' if seed is None else seed} |" if seed_column else ""))
    return lines


def render(rows: list, acc_float: dict, args, step: dict, missing: list = ()) -> str:
    lines = ["## QAT on Fashion-MNIST (test set of 10,000 images)", "",
             "Each row fine-tunes a bundled float checkpoint with the library's default recipe "
             "(`quant_ops/train/recipe.py`, nothing tuned per row or per model): the "
             "training policy (`QuantPolicy.for_training`: int8 weights below 8 bits keep the "
             "least-error clip on their grid instead of max|w|, int8 activations below 8 bits "
             "take the clip gradient), ranges calibrated first (the "
             "`auto` calibrator at the layer's bit width; weight ranges by MSE on each "
             "method's grid), one epoch over the row's budget of training images (batch 128, "
             "SGD momentum 0.9, SineScheduler, peak lr float lr / 400 at 8 bits and / 20 "
             "below), quantizer parameters with their method's lr and weight-decay "
             "multipliers. BN is folded with frozen statistics where the weight method keeps "
             "the weight scale (int8, LSQ, DSQ, FQN) and kept after the conv for DoReFa, QIL "
             "and GDRQ weights, its statistics then measured again on the calibration images "
             "with the quantized weights. The first conv and the classifier stay INT8. int8 activations "
             "use the unsigned grid (codes 0..2^b-1) on tensors the graph proves "
             "non-negative. A layer whose input can be negative (ResNet-20: the stem output, "
             "which has no ReLU; MobileNet: the linear bottlenecks and residual sums) reads "
             "it with the row method's signed form, or with the signed int8 quantizer at the "
             "row's activation bits where the method has none (DoReFa, QIL, DSQ, GDRQ, FQN). "
             "'before' is the calibrated net before fine-tuning."]
    current = code_version()
    for model in MODELS:
        mine = [r for r in rows if r.get("model", "resnet20") == model]
        if not mine:
            continue
        acc = acc_float[model]
        lines += ["", f"### {TITLES[model]} (float {acc:.2f}%)", ""]
        if model == "resnet20":
            lines += ["Seed: the seed toolkit's published CIFAR-10 ResNet-20 top-1 (fp32 "
                      f"{SEED_FP32}), for context only (another dataset).", ""]
        else:
            n = max(len(r.get("signed_inputs", [])) for r in mine)
            lines += [f"{n} layers read a tensor that can be negative (see above).", ""]
        lines += _table(mine, acc, model == "resnet20", current)
    used = sorted({r["activation"] for r in rows} & set(ACTIVATION_NOTES))
    if used:
        lines += [""] + [f"- {m} activations: {ACTIVATION_NOTES[m]}" for m in used]
    if any(r.get("code") != current for r in rows):
        lines += ["", "(stale): measured on code that has changed since (`code` in the JSON); "
                  "`--resume` runs it again."]
    if missing:
        lines += ["", f"Not measured in this run (time): {', '.join(missing)}."]
    lines += ["", f"Train step (ResNet-20, batch 128, hybridized, median of 20, same run): float "
              f"{step['float']:.1f} ms; W8A8 per-channel (`trt_int8`, BN folded as trained "
              f"here) {step['w8a8']:.1f} ms, ratio **{step['w8a8'] / step['float']:.2f}x**"
              + (f"; W8A8 with BN left unfolded {step['w8a8_bn_unfolded']:.1f} ms, ratio "
                 f"**{step['w8a8_bn_unfolded'] / step['float']:.2f}x**"
                 if "w8a8_bn_unfolded" in step else "") + ".", "",
              "Regenerate: `python bench/qat_table.py --resume` (this run: "
              f"`--train-images {args.train_images}`"
              + (f" --configs {args.configs}" if args.configs else "") + ")"]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str, marker: str = "## QAT on Fashion-MNIST") -> None:
    """Replace this table's section of ``path`` (other sections stay)."""
    old = path.read_text() if path.is_file() else "# Results\n\n"
    head, sep, tail = old.partition(marker)
    rest = ""
    if sep:
        nxt = tail.find("\n## ")
        rest = tail[nxt + 1:] if nxt >= 0 else ""
    atomic_write_text(path, head.rstrip() + "\n\n" + section + ("\n" + rest if rest else ""))


def _data(model: str, train_images: int) -> tuple:
    """(train x, train y, test x, test y) normalized as the model was trained; the same
    ``train_images`` images (seed 0) for every row."""
    info = load_float(model)[1]
    mean, std = info["normalize"]["mean"], info["normalize"]["std"]
    xtr, ytr = fashion_mnist("train")
    xte, yte = fashion_mnist("test")
    order = np.random.RandomState(0).permutation(len(xtr))[:train_images]
    return (xtr[order] - mean) / std, ytr[order], (xte - mean) / std, yte


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", help="comma list of method:W/A (default: each model's rows)")
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"comma list of models (default: {','.join(MODELS)})")
    ap.add_argument("--train-images", type=int, default=60000)
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of --json measured with the same setup")
    ap.add_argument("--step-only", action="store_true",
                    help="measure the train-step times again (a quiet machine) into the "
                         "existing JSON and re-render; no training")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite the section from --json without training (configs not "
                         "in it are listed as not measured)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "qat_table.json")
    args = ap.parse_args(argv)
    chosen = args.models.split(",")
    for m in chosen:
        if m not in MODELS:
            ap.error(f"unknown model {m!r} (known: {', '.join(MODELS)})")
    if args.configs:
        pairs = [tuple(c.split(":")) for c in args.configs.split(",")]
        for pair in pairs:
            if len(pair) != 2 or pair[0] not in METHODS:
                ap.error(f"--configs: {':'.join(pair)!r} is not method:W/A with a known "
                         f"method ({', '.join(METHODS)})")
        configs = [(m, n, b) for m in chosen for n, b in pairs]
    else:
        # the widths the targets name first (8/8, 4/4, 2/2 of every model), then 3/3, 3/4
        order = {b: i for i, b in enumerate(BITS)}
        configs = sorted(((m, n, b) for m in chosen for n, b in ROWS[m]),
                         key=lambda c: min(order[c[2]], 2))
    old = json.loads(args.json.read_text()) if args.json.is_file() else None
    if old is not None and not isinstance(old.get("float_accuracy"), dict):
        old["float_accuracy"] = {"resnet20": old["float_accuracy"]}   # before MobileNet rows
    if args.render_only or args.step_only:
        if old is None:
            ap.error(f"{args.json} does not exist: run the table first")
        if args.step_only:
            old["step_ms"] = step_times()
            atomic_write_text(args.json, json.dumps(old, indent=1))
        args.train_images = old["train_images"]
        have = {(r.get("model", "resnet20"), r["method"], r["bits"]) for r in old["rows"]}
        missing = [f"{m}/{n}:{b}" for m, n, b in configs if (m, n, b) not in have]
        section = render(old["rows"], old["float_accuracy"], args, old["step_ms"], missing)
        write_section(args.out, section)
        print(section)
        return 0
    step = step_times()
    print(json.dumps({"step_ms": step}), flush=True)
    setup = {"train_images": args.train_images}
    code = code_version()
    kept = []
    if args.resume and old is not None and all(old.get(k) == v for k, v in setup.items()):
        # rows of other code are stale and run again; other models' rows stay in the file
        kept = [r for r in old["rows"] if r.get("code") == code]
    done = {(r.get("model", "resnet20"), r["method"], r["bits"]): r for r in kept}
    acc_float = dict(old["float_accuracy"]) if kept else {}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = {}
    for model, name, bits in configs:
        if (model, name, bits) in done:
            continue
        if model not in data:
            data[model] = _data(model, args.train_images)
            fm = load_float(model)[0]
            acc_float[model] = fm.evaluate(data[model][2], data[model][3])
        done[(model, name, bits)] = run_config(model, name, bits, data[model], args)
        print(json.dumps(done[(model, name, bits)]), flush=True)
        # written after every row, so a long run that is stopped keeps what it measured
        rows = [done[k] for k in sorted(done, key=_order)]
        atomic_write_text(args.json, json.dumps({"float_accuracy": acc_float, "rows": rows,
                                                 "step_ms": step, **setup}, indent=1))
        write_section(args.out, render(rows, acc_float, args, step))
    rows = [done[k] for k in sorted(done, key=_order)]
    print(render(rows, acc_float, args, step))
    return 0


def _order(key: tuple) -> tuple:
    """Table order: model, then its rows as listed (configs outside ``ROWS`` last)."""
    model, name, bits = key
    listed = ROWS.get(model, [])
    pos = listed.index((name, bits)) if (name, bits) in listed else len(listed)
    return (list(MODELS).index(model), pos, name, bits)


if __name__ == "__main__":
    sys.exit(main())
