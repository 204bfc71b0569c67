#!/usr/bin/env python
"""ViT-B-32's image tower in torch eager vs ONNX Runtime vs OpenVINO, fp32, on this CPU (issue 18's probe).

    .venv/bin/pip install onnx onnxruntime openvino   # not project dependencies: only for this probe
    .venv/bin/python scripts/bench_runtimes.py [--batch 32] [--threads 2]

Prints wall and CPU milliseconds per image (best of 3 after a warm-up) and the mean cosine of each
runtime's embeddings against torch's. Random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _bench(fn: Callable[[], object], batch: int) -> tuple[float, float]:
    fn()
    walls, cpus = [], []
    for _ in range(3):
        t, c = time.perf_counter(), _cpu()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(_cpu() - c)
    return round(min(walls) / batch * 1000, 1), round(min(cpus) / batch * 1000, 1)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import open_clip
    import torch

    torch.set_num_threads(args.threads)
    model, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    tower = model.visual.eval()
    x = torch.randn(args.batch, 3, 224, 224)
    with torch.inference_mode():
        reference = tower(x).numpy()
        print("torch eager  ms/img (wall, cpu):", _bench(lambda: tower(x), args.batch))
    path = Path(tempfile.mkdtemp()) / "vit.onnx"
    torch.onnx.export(tower, x, str(path), input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}},
                      opset_version=17, dynamo=False)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    print("onnxruntime  ms/img (wall, cpu):", _bench(lambda: session.run(None, {"x": x.numpy()}), args.batch),
          "cosine", round(_cosine(session.run(None, {"x": x.numpy()})[0], reference), 6))
    import openvino as ov

    compiled = ov.Core().compile_model(ov.convert_model(str(path)), "CPU", {"INFERENCE_NUM_THREADS": args.threads})
    request = compiled.create_infer_request()
    print("openvino     ms/img (wall, cpu):", _bench(lambda: request.infer({0: x.numpy()}), args.batch),
          "cosine", round(_cosine(request.infer({0: x.numpy()})[0], reference), 6))


if __name__ == "__main__":
    main()
