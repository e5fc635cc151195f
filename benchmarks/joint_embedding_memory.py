"""Memory of joint_embedding's ``paper`` preset (64^3 volumes for the 3D network, 128 slices of 128^2 for
the 2D ResNet-50): does a training step at batch 8 fit in 24 GB of GPU memory with bf16?

On a CPU it runs one joint training step at batch 1 and measures what a GPU would have to hold:
parameters, gradients and Adam's two moments (fp32 master weights, as torch.autocast keeps them), and
the activations autograd saves for the backward pass, counted with
``torch.autograd.graph.saved_tensors_hooks`` by storage (a storage saved twice is counted once; the
parameters, which convolutions also save, are left out: they are in the weights). The saved tensors are
split by where they are saved: the 3D network and its losses (before the 2D branch of the step), and
the 2D branch (the 2D network, or with ``slice_chunk`` only its chunk boundaries, plus the slice
reduction, similarity and slice losses).

With ``slice_chunk`` (``--slice-chunk``, the preset's value by default) each chunk of slices is
gradient-checkpointed (non-reentrant). Inside a checkpointed region the checkpoint's own saved-tensor
hook is the innermost one, so this script's hook does not see the chunk's activations at all (checked:
it sees only the chunk input the checkpoint keeps and what is saved outside the region, real tensors,
not the checkpoint's holders); the counted figure is then the tensors that stay saved for the whole
step. The chunk's activations come back one chunk at a time in backward, so their peak is a constant,
measured by a separate forward of the 2D network over one chunk without checkpoint. Estimate at batch B:

    chunked:    weights + B x (3D + 2D boundary at batch 1) + one chunk's activations
    unchunked:  weights + B x (3D + 2D at batch 1)
    3D only:    3D weights + B x 3D at batch 1

each plus a 20% allowance for the allocator and workspaces. At batch 1 the paper's 2 x 128 slices fit
in one chunk of 256, which runs without checkpoint; the batch-1 step is then run with chunks of one
volume's slices, as batch B would run it (the boundary tensors do not depend on the chunk size).
The step runs in fp32 (bf16 on this CPU is emulated and 100x slower); under bf16 autocast the saved
convolution and activation tensors are bf16, so the bf16 figure halves the activations (an
approximation: normalisation statistics and the fp32 inputs of the networks stay fp32).
On a machine with a CUDA GPU, ``--cuda`` measures ``torch.cuda.max_memory_allocated`` for the real
batch instead (with the same ``slice_chunk``). Prints a table and writes JSON.

    python benchmarks/joint_embedding_memory.py                    # CPU estimate, preset's slice_chunk
    python benchmarks/joint_embedding_memory.py --slice-chunk 0    # the 2D network in one pass
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


class SavedTensors:
    """Bytes of the storages autograd saves while it is active, by phase; parameters excluded."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, tuple[str, int]] = {}
        self.phase = "3d"

    def pack(self, tensor):
        if isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self.params:
                self.seen.setdefault(storage.data_ptr(), (self.phase, storage.nbytes()))
        return tensor

    def bytes(self, phase: str | None = None) -> int:
        return sum(n for p, n in self.seen.values() if phase is None or p == phase)


def cpu_estimate(batch: int, preset: str, target: int, slice_chunk: int | None) -> dict:
    overrides = {} if slice_chunk is None else {"slice_chunk": slice_chunk}
    model = methods.get("joint_embedding").build(preset, pretrained_2d="none", **overrides)
    model.train()
    c = model.config
    chunk = c.slice_chunk
    per_volume = c.n_slices or c.image_size
    chunked = bool(chunk) and 2 * batch * per_volume > chunk
    if chunked and 2 * per_volume <= chunk:
        c.slice_chunk = per_volume  # batch 1 checkpointed as batch B is (boundaries do not depend on the size)
    optimizers = model.configure_optimizers("joint")
    params = sum(p.numel() for p in model.parameters())
    params3d = sum(p.numel() for p in model.net3d.parameters())
    counter = SavedTensors(model)
    run_2d = model._run_2d

    def run_2d_phase(*args):
        counter.phase = "2d"
        return run_2d(*args)

    model._run_2d = run_2d_phase
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        losses = model.training_step(fake_batch(1, c.image_size, "cpu"), "joint")
    step_optimizers(optimizers, losses)
    seconds = time.perf_counter() - t0
    del losses
    act3d, act2d = counter.bytes("3d"), counter.bytes("2d")
    chunk_peak = 0
    if chunked:  # one chunk's activations, recomputed in backward: a forward without checkpoint
        c.slice_chunk = chunk
        one = SavedTensors(model)
        slices = torch.rand(min(chunk, 2 * batch * per_volume), 1, c.image_size, c.image_size)
        with torch.autograd.graph.saved_tensors_hooks(one.pack, lambda t: t):
            model.net2d(slices)
        chunk_peak = one.bytes()
    weights = params * (4 + 4 + 8)  # fp32 weights, gradients, Adam's two moments
    weights3d = params3d * (4 + 4 + 8)

    def estimate(scale: float) -> float:
        return (weights + scale * (batch * (act3d + act2d) + chunk_peak)) * 1.2

    bf16 = estimate(0.5)
    return {
        "preset": preset, "slice_chunk": chunk, "checkpointed": chunked, "parameters_m": params / 1e6,
        "parameters_3d_m": params3d / 1e6, "weights_grads_adam_gib": weights / GIB,
        "activations_batch1_3d_fp32_gib": act3d / GIB,
        ("activations_batch1_2d_boundary_fp32_gib" if chunked else "activations_batch1_2d_fp32_gib"): act2d / GIB,
        "activations_one_chunk_fp32_gib": chunk_peak / GIB, "batch": batch,
        "estimate_fp32_gib": estimate(1.0) / GIB, "estimate_bf16_gib": bf16 / GIB, "fits_bf16": bf16 < target * GIB,
        "estimate_3d_only_fp32_gib": (weights3d + batch * act3d) * 1.2 / GIB,
        "estimate_3d_only_bf16_gib": (weights3d + batch * act3d / 2) * 1.2 / GIB,
        "target_gib": target, "cpu_step_batch1_s": seconds,
        "how": "CPU fp32 step at batch 1, saved tensors counted by storage without parameters; "
               "x batch (+ one chunk's activations when checkpointed); bf16 = activations / 2; +20%",
    }


def cuda_measure(batch: int, preset: str, target: int, slice_chunk: int | None) -> dict:
    overrides = {} if slice_chunk is None else {"slice_chunk": slice_chunk}
    model = methods.get("joint_embedding").build(preset, pretrained_2d="none", **overrides).cuda()
    model.train()
    optimizers = model.configure_optimizers("joint")
    data = fake_batch(batch, model.config.image_size, "cuda")
    torch.cuda.reset_peak_memory_stats()
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
    return {"preset": preset, "slice_chunk": model.config.slice_chunk, "batch": batch, "peak_gib": peak / GIB,
            "fits_bf16": peak < target * GIB, "target_gib": target, "step_s": sorted(times)[1],
            "device": torch.cuda.get_device_name(), "how": "CUDA, bf16 autocast, max_memory_allocated over 3 steps"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--target-gib", type=int, default=24)
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--slice-chunk", type=int, default=None,
                        help="slices per checkpointed chunk of the 2D network (default: the preset's; 0: one pass)")
    parser.add_argument("--out", default=str(RESULTS / "joint_embedding_memory.json"))
    args = parser.parse_args()
    result = (cuda_measure if args.cuda else cpu_estimate)(args.batch, args.preset, args.target_gib, args.slice_chunk)
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
