"""Inference throughput of each shipped network: Mpix/s and tiles/s at batch 1/8/16, eager vs
channels_last vs torch.compile, on CPU (and on CUDA when present).

    .venv/bin/python benchmarks/bench_models.py [--tile 256] [--repeats 3] [--no-compile]

Prints one table row per (network, device, mode, batch). Uses the shipped weights in models/weights/
(or random weights of the same architecture when a kind has none yet, said in the output).
"""
from __future__ import annotations

import argparse
import time

import torch

from deepmosaic.models.registry import build
from deepmosaic.models.train import RECIPES
from deepmosaic.models.weights_io import WeightsError, load_model, shipped


def load(kind: str):
    try:
        return load_model(shipped(kind)), "shipped"
    except WeightsError:
        r = RECIPES[kind]
        return build(r.arch, **r.default_model).eval(), "random (no shipped weights)"


def measure(model, x, repeats: int) -> float:
    with torch.inference_mode():
        model(x)  # warm-up (and compilation)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", default="1,8,16")
    p.add_argument("--no-compile", action="store_true")
    a = p.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, tile {a.tile}x{a.tile}")
    print(f"{'network':<9} {'weights':<10} {'device':<6} {'mode':<14} {'batch':>5} {'tiles/s':>8} {'Mpix/s':>7}")
    for kind, recipe in RECIPES.items():
        if kind == "morphology":  # a stamp regressor, not a dense map: see benchmarks/bench_morphology.py
            continue
        base, origin = load(kind)
        c_in = base.config.in_channels
        for dev in devices:
            modes = ["eager", "channels_last"] + ([] if a.no_compile else ["compile"])
            for mode in modes:
                model = base.to(dev)
                if mode != "eager":
                    model = model.to(memory_format=torch.channels_last)
                if mode == "compile":
                    model = torch.compile(model)
                for bs in (int(b) for b in a.batches.split(",")):
                    x = torch.randn(bs, c_in, a.tile, a.tile, device=dev)
                    if mode != "eager":
                        x = x.contiguous(memory_format=torch.channels_last)
                    try:
                        t = measure(model, x, a.repeats)
                    except Exception as e:  # e.g. torch.compile without a compiler toolchain
                        print(f"{kind:<9} {origin[:10]:<10} {dev:<6} {mode:<14} {bs:>5}   failed: {type(e).__name__}")
                        break
                    print(f"{kind:<9} {origin[:10]:<10} {dev:<6} {mode:<14} {bs:>5} {bs / t:>8.1f} "
                          f"{bs * a.tile * a.tile / t / 1e6:>7.2f}")


if __name__ == "__main__":
    main()
