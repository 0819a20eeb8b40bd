"""Fuzz the readers of user files: symbol JSON and params, through the toolkit's loaders
(``QuantizedModel.from_symbol`` + ``set_input_shape``: IR checks, params checks, MXNet's
load) beside MXNet's own (``mx.sym.load`` + ``infer_shape``, ``mx.nd.load``) on the same
mutated files, each case in a worker process so that a crash is seen, not suffered.

    python bench/fuzz_readers.py --seconds 3600          # the hour the issue asks for
    python bench/fuzz_readers.py --seconds 120 --json bench/results/fuzz_readers.json

Outcome per case and reader: ``ok`` (loaded), ``error`` (the reader's own clean error:
QuantOpsError for the toolkit, MXNetError for MXNet), ``other`` (any other exception: a
bug in the toolkit), ``crash`` (the process died).  Cases that crash or raise ``other`` in
the toolkit are saved under ``--keep`` to reproduce.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PREFIX = ROOT / "examples" / "models" / "fmnist_resnet20"
SHAPE = (1, 1, 28, 28)
WEIRD = [-5, -1, 0, 1, 3, 7, 2 ** 31, 10 ** 12, 1.5, "x", None, [], {}, "(1,)", "(-1, 0)",
         "(99999999, 99999999)", "True", "nan", "inf", "1e309", "__import__('os')"]


def mutate_json(text: str, rng: random.Random) -> bytes:
    """Structure-aware edits of a symbol JSON (indices, attributes, ops), or raw bytes."""
    if rng.random() < 0.2:
        return mutate_bytes(text.encode(), rng)
    d = json.loads(text)
    for _ in range(rng.randint(1, 4)):
        nodes = d["nodes"]
        n = rng.choice(nodes)
        if not isinstance(n.get("inputs", []), list):
            n["inputs"] = []
        kind = rng.randrange(7)
        if kind == 0 and n.get("inputs"):
            e = rng.choice(n["inputs"])
            e[rng.randrange(len(e))] = rng.choice(WEIRD)
        elif kind == 1:
            d["heads"] = [[rng.choice(WEIRD), rng.choice(WEIRD), 0]]
        elif kind == 2:
            if not isinstance(n.get("attrs"), dict):   # an earlier edit made it something else
                n["attrs"] = {}
            attrs = n["attrs"]
            key = rng.choice(list(attrs) or ["kernel", "num_filter", "nbits"])
            attrs[key] = str(rng.choice(WEIRD))
        elif kind == 3:
            n["op"] = rng.choice(["Convolution", "FullyConnected", "null", "Nope", "Custom",
                                  "Quantization_int8", "PACT", "BatchNorm"])
        elif kind == 4:
            n["name"] = rng.choice([nodes[0]["name"], "", "a/b", "x" * 300])
        elif kind == 5 and len(nodes) > 2:
            del nodes[rng.randrange(1, len(nodes))]
        else:
            n[rng.choice(["inputs", "attrs", "name", "op"])] = rng.choice(WEIRD)
    return json.dumps(d).encode()


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(4)
    if kind == 3:                          # a size field (count, rank, dim) set to a weird int
        i = rng.randrange(len(b) - 8)
        width = rng.choice((4, 8))
        v = rng.choice([-1, 0, 1, 7, 33, 2 ** 31 - 1, 2 ** 40, 2 ** 62]) % (1 << (8 * width))
        b[i:i + width] = v.to_bytes(width, "little")
    elif kind == 0:                          # flip bytes (the header more often)
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(min(len(b), 256)) if rng.random() < 0.5 else rng.randrange(len(b))
            b[i] = rng.randrange(256)
    elif kind == 1:                        # truncate
        del b[rng.randrange(len(b)):]
    else:                                  # splice a chunk from elsewhere
        i, j = sorted(rng.randrange(len(b)) for _ in range(2))
        b[i:i] = b[j:j + rng.randint(1, 64)]
    return bytes(b)


def _toolkit(sym: Path, params: Path) -> str:
    from quant_ops import QuantizedModel
    from quant_ops.errors import QuantOpsError

    try:
        QuantizedModel.from_symbol(sym, params).set_input_shape(SHAPE)
        return "ok"
    except QuantOpsError:
        return "error"
    except Exception as e:   # noqa: BLE001  (what the fuzzer looks for)
        return f"other: {type(e).__name__}: {str(e)[:120]}"


def _mxnet(sym: Path, params: Path) -> str:
    import mxnet as mx

    try:
        mx.nd.load(str(params))
        mx.sym.load(str(sym)).infer_shape(data=SHAPE)
        return "ok"
    except mx.base.MXNetError:
        return "error"
    except Exception as e:   # noqa: BLE001
        return f"other: {type(e).__name__}"


def _worker(reader: str, sym: str, params: str, q) -> None:
    import os

    q.put((_toolkit if reader == "toolkit" else _mxnet)(Path(sym), Path(params)))
    q.close()
    q.join_thread()
    os._exit(0)          # MXNet's own teardown takes seconds and proves nothing here


def run_case(reader: str, sym: Path, params: Path, timeout: float = 60) -> str:
    q = mp.get_context("fork").Queue()
    p = mp.get_context("fork").Process(target=_worker, args=(reader, str(sym), str(params), q))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        return "hang"
    return q.get() if p.exitcode == 0 and not q.empty() else f"crash (exit {p.exitcode})"


def _write(path: Path, case: int, t0: float, seed: int, counts: dict, found: list) -> dict:
    """The result so far, replaced atomically (a long run leaves its counts if stopped)."""
    result = {"cases": case, "seconds": round(time.time() - t0), "seed": seed,
              "outcomes": counts, "toolkit_failures": found}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qo_fuzz"))
    ap.add_argument("--keep", type=Path, default=Path("bench/results/fuzz_cases"))
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "fuzz_readers.json")
    args = ap.parse_args(argv)
    import os

    os.environ.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")
    import quant_ops  # noqa: F401  (imported once; each case forks from here)

    rng = random.Random(args.seed)
    text = Path(f"{PREFIX}-symbol.json").read_text()
    raw = Path(f"{PREFIX}-0000.params").read_bytes()
    args.work.mkdir(parents=True, exist_ok=True)
    counts = {r: {} for r in ("toolkit", "mxnet")}
    found = []
    t0, case = time.time(), 0
    while time.time() - t0 < args.seconds:
        case += 1
        sym, params = args.work / "m-symbol.json", args.work / "m-0000.params"
        which = rng.random()
        sym.write_bytes(mutate_json(text, rng) if which < 0.7 else text.encode())
        params.write_bytes(mutate_bytes(raw, rng) if which >= 0.5 else raw)
        for reader in counts:
            out = run_case(reader, sym, params)
            key = out.split(":")[0].split(" (")[0]
            counts[reader][key] = counts[reader].get(key, 0) + 1
            if reader == "toolkit" and key not in ("ok", "error"):
                keep = args.keep / f"case{case:05d}"
                keep.mkdir(parents=True, exist_ok=True)
                (keep / "m-symbol.json").write_bytes(sym.read_bytes())
                (keep / "m-0000.params").write_bytes(params.read_bytes())
                found.append({"case": case, "outcome": out, "saved": str(keep)})
        if case % 50 == 0:
            _write(args.json, case, t0, args.seed, counts, found)
    result = _write(args.json, case, t0, args.seed, counts, found)
    print(f"{case} mutated (symbol, params) pairs in {result['seconds']} s")
    print(f"{'reader':<8} " + " ".join(f"{k:>8}" for k in ("ok", "error", "other", "crash",
                                                           "hang")))
    for reader, c in counts.items():
        print(f"{reader:<8} " + " ".join(f"{c.get(k, 0):>8}" for k in ("ok", "error", "other",
                                                                       "crash", "hang")))
    for f in found:
        print("toolkit failure:", f)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
