"""Training-step time of fracgraph's default artifacts (FW8/BW8) against PyTorch eager FP32 on the same model:
torchvision resnet18, efficientnet_b0, regnet_x_400mf (random weights, batch 32, 64x64 inputs) and fracgraph's
resnet20 (batch 128, 32x32), 10 classes. Issue 20's goal is every ratio <= 1.0.

Each configuration runs in its own worker process and the workers take turns one step at a time, the order
alternating (A B, B A, ...), each step after a short settle, so that both see the same background load; a round
is `--steps` steps of each, and the script prints every round's medians and ratio, then the range over rounds.
`--off PASS` adds a worker on artifacts built without that training-graph pass (e.g. `--off conv-grad-w`:
the pass's own effect, interleaved the same way); `--baseline DIR` one on artifacts built and run by the
fracgraph of another checkout (e.g. `git worktree add /tmp/base main`: this branch against main). `--profile` then prints `fracgraph profile`'s top op types
and nodes of the default artifacts (which op holds a model above 1.0x).

torchvision is imported without its compiled ops (its CUDA wheel's `import torchvision` fails with the CPU torch;
the model code is pure Python): `pip install --no-deps torchvision` is enough.

    python bench/model_speed.py [--models resnet18,efficientnet_b0,regnet_x_400mf,resnet20,CORPUS_NAME] [--rounds 3]
                                [--steps 3] [--threads 2] [--off conv-grad-w] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# model -> (batch, input size)
MODELS = {"resnet18": (32, 64), "efficientnet_b0": (32, 64), "regnet_x_400mf": (32, 64), "resnet20": (128, 32)}
DIRECT = tuple(MODELS)   # built here; every other name is a model-corpus entry (fracgraph/zoo_external.py), batch 32, 64x64


def _geometry(name: str) -> tuple[int, int]:
    """(batch, input size) of a model: MODELS', or the corpus' 32 at 64x64."""
    return MODELS.get(name, (32, 64))


def _corpus_names() -> tuple[str, ...]:
    from fracgraph import zoo_external

    return tuple(e.name for e in zoo_external.CORPUS)


def _torchvision_models():
    """torchvision.models' resnet18, efficientnet_b0 and regnet_x_400mf, imported as the corpus imports them
    (zoo_external.import_torchvision: the package without torchvision's __init__, which loads the compiled ops).
    A stub of torchvision.models of this script's own, as before, left the corpus' later imports (densenet121)
    without their models when a direct model was measured first."""
    from fracgraph import zoo_external

    tvm = zoo_external.import_torchvision()
    return {"resnet18": tvm.resnet18, "efficientnet_b0": tvm.efficientnet_b0, "regnet_x_400mf": tvm.regnet_x_400mf}


def torch_model(name: str):
    import torch

    if name == "resnet20":
        from fracgraph.zoo import build

        return build("resnet20", seed=0)
    if name not in DIRECT:
        from fracgraph import zoo_external

        return zoo_external.torch_model(zoo_external.entry(name))
    torch.manual_seed(0)
    return _torchvision_models()[name](num_classes=10).eval()


def prepare(name: str, directory: Path, off: list[str]) -> None:
    """Export the model (opset 17, eval-mode graph, no constant folding) and build the default artifacts, and
    the artifacts without each pass of `off`."""
    import torch

    from fracgraph.build import BuildOptions, build_artifacts

    batch, size = _geometry(name)
    path = directory / f"{name}.onnx"
    if name not in DIRECT:   # the corpus's export (bench/step_time.py --corpus builds it the same way)
        from fracgraph import zoo_external

        zoo_external.export_entry(zoo_external.entry(name), path, classes=10, size=size)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(torch_model(name), torch.randn(2, 3, size, size), str(path), dynamo=False,
                              training=torch.onnx.TrainingMode.EVAL, do_constant_folding=False, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=17)
    build_artifacts(path, directory / "art", BuildOptions(fw=8, bw=8), force=True)
    for p in off:
        build_artifacts(path, directory / f"art-{p}", BuildOptions(fw=8, bw=8, skip_passes=(p,)), force=True)


def make_step(kind: str, name: str, directory: Path, threads: int):
    batch, size = _geometry(name)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int64)
    if kind == "torch":
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(threads)
        model = torch_model(name).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xt), yt).backward()
            opt.step()

        return step
    from onnxruntime.training import api  # noqa: F401  (import outside TrainSession, see fracgraph/profile.py)

    from fracgraph.runtime import TrainSession

    sess = TrainSession(directory / kind, threads=threads, seed=0)
    bits = np.full((sess.manifest.n_blocks, 3), 8, np.float32)
    return lambda: sess.step(x, y, bits, 0.01)


def worker(a) -> None:
    step = make_step(a.worker, a.model, Path(a.dir), a.threads)
    print("ready", flush=True)
    for line in sys.stdin:
        t = time.perf_counter()
        step()
        print(f"{time.perf_counter() - t:.6f}", flush=True)


class Worker:
    def __init__(self, label, kind, a, directory, root=None):
        self.label = label
        env = dict(os.environ, PYTHONPATH=str(root)) if root else None
        self.p = subprocess.Popen([sys.executable, __file__, "--worker", kind, "--model", a.model_now, "--dir",
                                   str(directory), "--threads", str(a.threads)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        line = self.p.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"{label}: worker said {line!r}")

    def step(self) -> float:
        self.p.stdin.write("step\n")
        self.p.stdin.flush()
        return float(self.p.stdout.readline())

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=60)


def measure(name: str, a) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"model-speed-{name}-") as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        prepare(name, d, a.off)
        quantize_s = time.perf_counter() - t0
        a.model_now = name
        configs = [("fracgraph FW8/BW8", "art", None)] + [(f"fracgraph without {p}", f"art-{p}", None) for p in a.off]
        nodes = {}   # the training graph's top-level nodes and Ifs of each configuration built here
        for label, kind, _ in configs:
            import onnx

            g = onnx.load(str(d / kind / "training_model.onnx"), load_external_data=False).graph
            nodes[label] = (len(g.node), sum(n.op_type == "If" for n in g.node))
        if a.baseline:   # the other checkout builds its own artifacts, and its worker imports it first
            code = ("import sys; from fracgraph.build import BuildOptions, build_artifacts; "
                    "build_artifacts(sys.argv[1], sys.argv[2], BuildOptions(fw=8, bw=8), force=True)")
            subprocess.run([sys.executable, "-c", code, str(d / f"{name}.onnx"), str(d / "art-baseline")], check=True,
                           env=dict(os.environ, PYTHONPATH=str(a.baseline)), cwd=a.baseline)
            configs.append(("baseline FW8/BW8", "art-baseline", a.baseline))
        configs.append(("PyTorch FP32", "torch", None))
        workers = [Worker(label, kind, a, d, root) for label, kind, root in configs]
        try:
            for _ in range(2):   # warm-up
                for w in workers:
                    w.step()
            rounds = []
            for r in range(a.rounds):
                times = {w.label: [] for w in workers}
                for i in range(a.steps):
                    order = workers if (r * a.steps + i) % 2 == 0 else workers[::-1]
                    for w in order:
                        time.sleep(a.settle)
                        times[w.label].append(w.step())
                med = {k: statistics.median(v) for k, v in times.items()}
                rounds.append(med)
                base = med["PyTorch FP32"]
                print(f"  round {r + 1}: " + ", ".join(f"{k} {v:.3f} s" + ("" if k == "PyTorch FP32" else f" ({v / base:.2f}x)")
                                                   for k, v in med.items()), flush=True)
        finally:
            for w in workers:
                w.close()
        out = {"quantize_s": quantize_s, "rounds": rounds, "nodes": nodes}
        if a.profile:
            from fracgraph.profile import profile_step, render

            batch, _ = _geometry(name)
            print("\n".join("    " + line for line in render(profile_step(d / "art", batch=batch, steps=2,
                                                                       threads=a.threads, top=8), limit=10).splitlines()))
        from fracgraph.manifest import Manifest

        choices = Manifest.read(d / "art").extra.get("conv_grad_w") or []
        out["dw_forms"] = {f: sum(c["form"] == f for c in choices) for f in sorted({c["form"] for c in choices})}
        forms = Manifest.read(d / "art").extra.get("conv_forms") or []   # nchwc-conv: forward and dX forms
        out["conv_forms"] = {f"{c['role']} {c['form']}": sum((x["role"], x["form"]) == (c["role"], c["form"]) for x in forms)
                             for c in forms}
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS), help="also any model-corpus name (convnext_atto, vit_tiny, ...)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="steps of each configuration per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--settle", type=float, default=0.3)
    ap.add_argument("--off", action="append", default=[], metavar="PASS",
                    help="also time artifacts built without this training-graph pass (repeatable)")
    ap.add_argument("--baseline", metavar="DIR", help="also time the fracgraph of this checkout (its own artifacts)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    results = {}
    for name in a.models.split(","):
        if name not in MODELS and name not in _corpus_names():
            raise SystemExit(f"unknown model {name!r}; one of {', '.join(DIRECT + _corpus_names())}")
        batch, size = _geometry(name)
        print(f"{name}: batch {batch}, {size}x{size}, {a.threads} threads, {a.rounds} rounds of {a.steps} alternated steps")
        results[name] = r = measure(name, a)
        print(f"  conv weight-gradient forms: {r['dw_forms']}; forward/dX forms: {r['conv_forms']}; "
              f"quantize {r['quantize_s']:.1f} s")
        print("  training graph: " + "; ".join(f"{k} {n} nodes ({i} If)" for k, (n, i) in r["nodes"].items()))
        for label in r["rounds"][0]:
            if label == "PyTorch FP32":
                continue
            ratios = [x[label] / x["PyTorch FP32"] for x in r["rounds"]]
            secs = [x[label] for x in r["rounds"]]
            base = [x["PyTorch FP32"] for x in r["rounds"]]
            print(f"  {label}: {min(secs):.3f}-{max(secs):.3f} s/step vs PyTorch FP32 {min(base):.3f}-{max(base):.3f}: "
                  f"ratio {min(ratios):.2f}-{max(ratios):.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
