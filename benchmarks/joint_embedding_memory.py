"""Memory of joint_embedding's ``paper`` preset (64^3 volumes for the 3D network, 128 slices of 128^2 for
the 2D ResNet-50): does a training step at batch 8 fit in 24 GB of GPU memory with bf16?

On a CPU it runs one joint training step at batch 1 and measures what a GPU would have to hold:
parameters, gradients and Adam's two moments (fp32 master weights, as torch.autocast keeps them), and
the activations autograd saves for the backward pass, counted exactly with
``torch.autograd.graph.saved_tensors_hooks`` (a tensor saved twice is counted once). The step runs in
fp32 (bf16 on this CPU is emulated and 100x slower); under bf16 autocast the saved convolution and
activation tensors are bf16, so the bf16 figure halves the fp32 one (an approximation: normalisation
statistics stay fp32). Activations grow linearly with the batch; the estimate at batch B is
``weights + B x activations(batch 1)``, plus a 20% allowance for the allocator and workspaces.
On a machine with a CUDA GPU, ``--cuda`` measures ``torch.cuda.max_memory_allocated`` for the real
batch instead. Prints a table and writes JSON.

    python benchmarks/joint_embedding_memory.py            # CPU estimate
    python benchmarks/joint_embedding_memory.py --cuda --batch 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from medood import methods
from medood.platform.train import step_optimizers

RESULTS = Path(__file__).parent / "results"
GIB = 2**30


def fake_batch(batch: int, size: int, device: str) -> dict:
    image = torch.zeros(batch, 1, size, size, size)
    lo, hi = size // 6, size - size // 6
    image[:, :, lo:hi, lo:hi, lo:hi] = torch.rand(batch, 1, hi - lo, hi - lo, hi - lo)
    return {"image": image.to(device)}


def cpu_estimate(batch: int, preset: str, target: int) -> dict:
    model = methods.get("joint_embedding").build(preset, pretrained_2d="none")
    model.train()
    optimizers = model.configure_optimizers("joint")
    params = sum(p.numel() for p in model.parameters())
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = model.training_step(fake_batch(1, model.config.image_size, "cpu"), "joint")
    activations = sum(seen.values())
    step_optimizers(optimizers, losses)
    seconds = time.perf_counter() - t0
    weights = params * (4 + 4 + 8)  # fp32 weights, gradients, Adam's two moments
    fp32 = (weights + batch * activations) * 1.2
    bf16 = (weights + batch * activations / 2) * 1.2
    return {
        "preset": preset, "parameters_m": params / 1e6, "weights_grads_adam_gib": weights / GIB,
        "activations_batch1_fp32_gib": activations / GIB, "batch": batch,
        "estimate_fp32_gib": fp32 / GIB, "estimate_bf16_gib": bf16 / GIB, "fits_bf16": bf16 < target * GIB,
        "target_gib": target, "cpu_step_batch1_s": seconds,
        "how": "CPU fp32 step at batch 1, saved tensors counted; bf16 = activations / 2; x batch; +20%",
    }


def cuda_measure(batch: int, preset: str, target: int) -> dict:
    model = methods.get("joint_embedding").build(preset, pretrained_2d="none").cuda()
    model.train()
    optimizers = model.configure_optimizers("joint")
    data = fake_batch(batch, model.config.image_size, "cuda")
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses = model.training_step(data, "joint")
        step_optimizers(optimizers, losses)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated()
    return {"preset": preset, "batch": batch, "peak_gib": peak / GIB, "fits_bf16": peak < target * GIB,
            "target_gib": target, "step_s": sorted(times)[1], "device": torch.cuda.get_device_name(),
            "how": "CUDA, bf16 autocast, max_memory_allocated over 3 steps"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--target-gib", type=int, default=24)
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "joint_embedding_memory.json"))
    args = parser.parse_args()
    result = (cuda_measure if args.cuda else cpu_estimate)(args.batch, args.preset, args.target_gib)
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
