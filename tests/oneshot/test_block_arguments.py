r"""Every block is calibrated on its own real arguments: an oracle against a full forward pass of the pruned model.

Models with per-layer attention (Gemma 3's sliding and full layers with their own rotary embeddings, Qwen2 with
sliding-window layers, Cohere2, GPT-OSS) call each block with its own mask and position embeddings. The inputs the
driver feeds to block `l` must equal what block `l` receives in a forward pass of the model once pruned: blocks
`< l` are pruned by then, and block `l` only sees their outputs.
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hfprune import PruningConfig, prune
from hfprune.calibration.capture import capture_block_inputs
from hfprune.models import find_decoder_blocks


SEQ_LEN, WINDOW = 32, 8  # the sliding window is shorter than the sequence, so sliding and full masks differ

MIXED_LAYER_CONFIGS = {
    "gemma3_text": {
        "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "num_hidden_layers": 4, "sliding_window": WINDOW,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    },
    "qwen2": {
        "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4,
        "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2,
    },
    "cohere2": {
        "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4,
        "sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"] * 2,
    },
    "gpt_oss": {
        "hidden_size": 64, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "num_hidden_layers": 4, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": WINDOW,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
    },
}  # fmt: skip


def build(model_type: str):
    try:
        config = AutoConfig.for_model(
            model_type, vocab_size=128, max_position_embeddings=64, **MIXED_LAYER_CONFIGS[model_type]
        )
        config._attn_implementation = "eager"  # the masks are explicit tensors
        model = AutoModelForCausalLM.from_config(config)
    except (ImportError, NotImplementedError, ValueError) as e:
        pytest.skip(f"cannot build a tiny {model_type} offline: {e}")
    return model.eval()


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def record_calls(blocks):
    calls = {i: [] for i in range(len(blocks))}

    def hook(index):
        def pre_hook(module, args, kwargs):
            kwargs = dict(kwargs)
            x = args[0] if args else kwargs.pop("hidden_states")
            calls[index].append((x.detach().clone(), args[1:], kwargs))

        return pre_hook

    handles = [block.register_forward_pre_hook(hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    return calls, handles


@pytest.mark.parametrize("model_type", sorted(MIXED_LAYER_CONFIGS))
def test_each_block_gets_the_arguments_of_a_full_forward_of_the_pruned_model(model_type):
    torch.manual_seed(0)
    model = build(model_type)
    _, blocks = find_decoder_blocks(model)
    tokens = torch.randint(0, 128, (4, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    config = PruningConfig(method="wanda", sparsity="2:4", num_calibration_samples=4, calibration_batch_size=2)

    driver_calls, handles = record_calls(blocks)
    prune(model, config, tokens, progress=False)
    for handle in handles:
        handle.remove()

    oracle_calls, handles = record_calls(blocks)
    with torch.no_grad():
        for start in (0, 2):
            model(input_ids=tokens[start : start + 2], use_cache=False)
    for handle in handles:
        handle.remove()

    for index in range(len(blocks)):
        # the driver runs each block once to collect statistics (the calls checked here), then to feed the next one;
        # before that, capture ran block 0 once on the first batch to learn the shape of a block's output
        fed = driver_calls[index][1:3] if index == 0 else driver_calls[index][:2]
        assert len(oracle_calls[index]) == 2
        for (x, args, kwargs), (x_ref, args_ref, kwargs_ref) in zip(fed, oracle_calls[index], strict=True):
            torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-6, msg=f"{model_type} block {index} hidden states")
            assert same(args, args_ref), f"{model_type} block {index}: positional arguments differ"
            assert kwargs.keys() == kwargs_ref.keys(), f"{model_type} block {index}"
            for key in kwargs:
                assert same(kwargs[key], kwargs_ref[key]), f"{model_type} block {index}: `{key}` differs"
    # the test means something: some block is called with other arguments than block 0 (replaying block 0's fails)
    differ = [i for i in range(1, len(blocks)) if not same(oracle_calls[0][0][2], oracle_calls[i][0][2])]
    assert differ, f"{model_type}: every block shares block 0's arguments"


def test_shared_arguments_are_stored_once():
    model = build("gemma3_text")
    _, blocks = find_decoder_blocks(model)
    tokens = torch.randint(0, 128, (4, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    inputs = capture_block_inputs(model, blocks, tokens, 2, torch.device("cpu"))
    assert len(inputs.hidden) == 2 and all(len(calls) == 2 for calls in inputs.call_arguments)
    kwargs = [[inputs.arguments(block, batch)[1] for batch in range(2)] for block in range(4)]
    sliding, full = kwargs[0][0]["attention_mask"], kwargs[1][0]["attention_mask"]
    assert not torch.equal(sliding, full)
    # blocks of one layer type and batches of one shape hold the very same tensor objects
    assert kwargs[2][0]["attention_mask"] is sliding and kwargs[3][1]["attention_mask"] is full
    assert kwargs[2][1]["position_embeddings"][0] is kwargs[0][0]["position_embeddings"][0]
    assert kwargs[1][0]["position_embeddings"][0] is not kwargs[0][0]["position_embeddings"][0]  # per layer type


def test_a_model_that_never_reaches_its_blocks_is_a_clear_error():
    model = build("qwen2")
    _, blocks = find_decoder_blocks(model)

    def no_blocks(*args, **kwargs):
        return None

    model.forward = no_blocks
    with pytest.raises(RuntimeError, match="did not reach decoder block 0"):
        capture_block_inputs(model, blocks, torch.zeros(2, 8, dtype=torch.long), 2, torch.device("cpu"))
