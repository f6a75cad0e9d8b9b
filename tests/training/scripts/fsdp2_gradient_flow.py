r"""GradientFlow on FSDP2 (`fully_shard`) parameters, on a CPU gloo mesh, against one unsharded process.

Run under `torchrun --nproc_per_node 2`. Every rank trains the same toy model twice from the same weights: sharded
with `fully_shard` on half the batch, and unsharded (what one process, or every DDP rank, holds) on the whole batch,
both driven through the events [`GradientFlowCallback`] uses. The toy model covers every sharded path:

```
module  type              weight (dim 0 sharded)   rows per rank (2 ranks)   N:M 2:4 mask
b       Conv1D(12, 16)    (in 16, out 12)          8 + 8                     local (8 % 4 == 0)
c       Conv1D(24, 12)    (in 12, out 24)          6 + 6                     gathered (6 % 4 != 0)
a       nn.Linear(24, 11) (out 11, in 24)          6 + 5 (uneven)            local (whole rows)
```

Weights start on a grid of 9 values (many ties), and everything runs in float64. Each rank writes
`<output>/rank<r>.json`: per checked item the largest difference (masks: count of differing bits), and the state
bytes per rank of the sharded and the unsharded run.

    torchrun --standalone --nproc_per_node 2 tests/training/scripts/fsdp2_gradient_flow.py OUTPUT --sparsity 2:4
"""

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers.pytorch_utils import Conv1D

from hfprune import PruningConfig
from hfprune.training import GradientFlow
from hfprune.training.state import load_pruning_state, save_pruning_state


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = Conv1D(12, 16)
        self.c = Conv1D(24, 12)
        self.a = nn.Linear(24, 11)

    def forward(self, x):
        return self.a(torch.tanh(self.c(torch.tanh(self.b(x)))))


def toy_model() -> Toy:
    torch.manual_seed(0)
    model = Toy().double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-4, 5, p.shape, dtype=torch.float64) / 8)  # a grid: ties everywhere
    return model


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, flow: GradientFlow) -> dict[str, int]:
    r"""Bytes this rank holds: parameters, gradients, Adam moments, latent weights and bool keep masks."""

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    params = [local(p) for p in model.parameters()]
    moments = [local(v) for s in optimizer.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
    return {
        "parameters": tensor_bytes(params),
        "gradients": tensor_bytes(local(p.grad) for p in model.parameters()),
        "adam_moments": tensor_bytes(moments),
        "latent_weights": tensor_bytes(e.latent for e in flow.targets.values()),
        "keep_masks": tensor_bytes(e.keep_mask for e in flow.targets.values()),
    }


def train(model, flow, optimizer, x, y, steps, start, max_steps, on_step=None):
    flow.start(start, max_steps)
    for step in range(start, start + steps):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        flow.before_optimizer_step()
        optimizer.step()
        flow.after_optimizer_step(step + 1)
        if on_step is not None:
            on_step(step + 1)
        optimizer.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--gradient-flow", default="mdgf_exp")
    parser.add_argument("--steps", type=int, default=8)
    options = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    config = PruningConfig(
        sparsity=options.sparsity, gradient_flow=options.gradient_flow, targets=["a", "b", "c"], finetune_fraction=0.25
    )
    steps, middle = options.steps, options.steps // 2
    x = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(8, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)  # this rank's half of the batch

    # 1. one unsharded process on the whole batch
    ref_model = toy_model()
    ref_flow = GradientFlow(ref_model, config)
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=2e-2)
    ref_states, ref_bytes = {}, {}

    def on_ref_step(step):
        ref_states[step] = {k: t.clone() for k, t in ref_flow.state_dict().items()}
        ref_bytes.update(state_bytes(ref_model, ref_opt, ref_flow))  # before the gradients are freed

    train(ref_model, ref_flow, ref_opt, x, y, steps, 0, steps, on_ref_step)
    ref_final = ref_flow.final_keep_masks()
    ref_flow.finish()

    # 2. fully_shard, then GradientFlow on the DTensor parameters, this rank's half of the batch
    model = toy_model()
    for name in ("b", "c", "a"):
        fully_shard(getattr(model, name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    flow = GradientFlow(model, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    results: dict[str, float] = {}
    sharded_bytes = {}

    def check(label, whole, reference):
        for name in reference:
            got, want = whole[name], reference[name]
            if got.dtype == torch.bool:
                results[f"{label}/{name}"] = int((got != want).sum())
            else:
                results[f"{label}/{name}"] = float((got - want).abs().max())

    def on_step(step):
        state = flow.state_dict()  # collective: whole latent weights and masks
        check(f"state@{step}", state, ref_states[step])
        sharded_bytes.update(state_bytes(model, optimizer, flow))
        if step == middle:
            os.makedirs(options.output, exist_ok=True)
            save_pruning_state(flow, options.output, step, write=rank == 0)

    train(model, flow, optimizer, x[rows], y[rows], steps, 0, steps, on_step)
    check("final_keep_masks", flow.gather(flow.final_keep_masks()), ref_final)
    flow.finish()
    check("finished_weights", flow.gather({n: e.local for n, e in flow.targets.items()}), ref_flow.sparse_weights())

    # 3. resume from the checkpoint of step `middle` on a fresh sharded model: masks and latent weights come back
    dist.barrier()
    resumed_model = toy_model()
    for name in ("b", "c", "a"):
        fully_shard(getattr(resumed_model, name), mesh=mesh)
    fully_shard(resumed_model, mesh=mesh)
    resumed = GradientFlow(resumed_model, config)
    resumed.load_state_dict(*load_pruning_state(options.output))
    resumed.start(middle, steps)
    check(f"resumed@{middle}", resumed.state_dict(), ref_states[middle])

    # 4. the Trainer's order: GradientFlow on the plain model with known masks, then `fully_shard` (accelerate's
    #    `prepare`), then `start`: the parameters are looked up again and the masks cut to the local rows
    known = {n: e.out_in(ref_final[n]) for n, e in ref_flow.targets.items()}  # (out, in)
    late_model = toy_model()
    late = GradientFlow(late_model, PruningConfig(**{**config.to_dict(), "gradient_flow": "none"}), known)
    for name in ("b", "c", "a"):
        fully_shard(getattr(late_model, name), mesh=mesh)
    fully_shard(late_model, mesh=mesh)
    late.start(0, steps)
    check("late_keep_masks", late.gather({n: e.keep_mask for n, e in late.targets.items()}), ref_final)
    dense = {n: e.weight * ref_final[n] for n, e in GradientFlow(toy_model(), config).targets.items()}
    check("late_weights", late.gather({n: e.local for n, e in late.targets.items()}), dense)

    record = {"rank": rank, "world_size": world, "results": results, "bytes": sharded_bytes, "ref_bytes": ref_bytes}
    record["shard_rows"] = {n: [e.shard.offset, e.shard.rows] for n, e in flow.targets.items()}
    with open(os.path.join(options.output, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
