r"""Run under torchrun with 2 ranks: rank 1's kernel fails in block 1; both ranks must stop with an error, no output."""

import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig

import hfprune
from hfprune.oneshot.methods import METHODS, PruningMethod


def main(output: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=3, vocab_size=128)
    )  # fmt: skip
    wanda = METHODS["wanda"]
    calls = []

    def failing(weight, stats, target, config):
        calls.append(1)
        if dist.get_rank() == 1 and len(calls) > 4:  # rank 1, in decoder block 1
            raise ValueError("a kernel failed on purpose")
        return wanda.prune_weight(weight, stats, target, config)

    METHODS["wanda"] = PruningMethod("wanda", "input_norm", failing, wanda.prepare)
    config = hfprune.PruningConfig(method="wanda", sparsity="2:4", num_calibration_samples=8, calibration_batch_size=2)
    tokens = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    try:
        report = hfprune.prune(model, config, tokens, progress=False)
        hfprune.save_pruned(model, output, config, report)
    except (ValueError, RuntimeError) as e:
        sys.stderr.write(f"rank {dist.get_rank()} stopped: {e}\n")
        sys.exit(3)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
