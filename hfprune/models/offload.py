r"""Models dispatched with a `device_map` (accelerate hooks): CPU- and disk-offloaded decoder blocks.

An offloaded module holds its parameters on the `meta` device; its accelerate `AlignDevicesHook` loads them from a
`weights_map` for each forward pass and drops them after. To prune such a block, [`onloaded`] materialises its
parameters on the pruning device (a copy), turns the hooks' offloading off while the block is calibrated and pruned,
then writes the pruned values back where the hooks read them and puts the block back on `meta`:

```
weights_map entry                     write-back
CPU offload (a state dict)            the dict entry is replaced by the pruned tensor
disk offload, `.dat` file             the file is rewritten in the hook's offload folder
disk offload, read from the           the pruned tensor goes to `offload_folder` as a `.dat` file and the index points
checkpoint's own safetensors          there (the checkpoint itself is never modified)
```

`save_pretrained` then reads the pruned values through the same hooks, one shard at a time.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextmanager
def offload_messages_silenced() -> Iterator[None]:
    r"""Silences the two messages about offloaded models that tell a user of hfprune nothing to act on, where they
    arise: accelerate's "Some parameters are on the meta device because they were offloaded" when a `device_map`
    offloads (hfprune streams blocks from disk on purpose), and transformers' "Attempting to save a model with
    offloaded modules ... (50GB default)" when one is saved (hfprune passes the shard size it means)."""
    drop = _DropMessages("Some parameters are on the meta device because they were offloaded")
    accelerate_logger = logging.getLogger("accelerate.big_modeling")
    accelerate_logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Attempting to save a model with offloaded modules", UserWarning)
            yield
    finally:
        accelerate_logger.removeFilter(drop)


def offload_hooks(module: nn.Module) -> list:
    r"""The offloading `AlignDevicesHook`s attached to `module` itself (inside a `SequentialHook` or not)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    hooks = getattr(hook, "hooks", None) or [hook]
    return [h for h in hooks if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None]


def execution_device(module: nn.Module) -> torch.device | None:
    r"""The device `module`'s accelerate hook runs it on (`None` without a hook that says)."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return None


def is_offloaded(module: nn.Module) -> bool:
    r"""Whether any parameter of `module` (or its submodules) lives in an accelerate offload map."""
    return any(offload_hooks(m) for m in module.modules())


def block_devices(block: nn.Module) -> set[torch.device]:
    r"""The devices a block's parameters and buffers sit on."""
    return {t.device for t in [*block.parameters(), *block.buffers()]}


@contextmanager
def onloaded(
    block: nn.Module, device: torch.device, offload_folder: str | None = None, write_back: bool = True
) -> Iterator[nn.Module]:
    r"""Puts `block` on `device` for the duration, offloaded parameters included, and back where it was after.

    Args:
        block (`nn.Module`): a decoder block, possibly with accelerate offload hooks on its submodules.
        device (`torch.device`): where the block runs while it is pruned.
        offload_folder (`str`, *optional*): where the pruned weights of blocks whose offloaded weights are read
            from the checkpoint's own safetensors go. Required for those blocks.
        write_back (`bool`, *optional*, defaults to `True`): write offloaded weights back (`False`: the block is
            only run, not changed).
    """
    hooked = [(m, h) for m in block.modules() for h in offload_hooks(m)]
    if not hooked:
        devices = block_devices(block)
        if len(devices) > 1:
            raise ValueError(
                f"a decoder block of this model sits on several devices ({', '.join(sorted(map(str, devices)))}); "
                "hfprune prunes one whole block at a time. Load it with a `device_map` that keeps every decoder "
                "block on one device (`no_split_module_classes`, or `device_map='auto'`)."
            )
        home = next(iter(devices), torch.device("cpu"))
        block.to(device)
        try:
            yield block
        finally:
            block.to(home)
        return
    materialised = []
    for module, hook in hooked:
        for name in _offloaded_tensors(module, hook):
            value = hook.weights_map[name].to(device, copy=True)  # a copy: never a view of a memory-mapped file
            _set(module, name, value)
            materialised.append((module, hook, name))
        hook.offload = False  # the hook now only moves inputs; the parameters stay
    try:
        yield block
        for module, hook, name in materialised if write_back else ():
            _write_back(hook.weights_map, name, _get(module, name).detach(), offload_folder)
    finally:
        for module, _, name in materialised:
            _set(module, name, None)
        for _, hook in hooked:
            hook.offload = True
        materialised.clear()
        release_freed_memory()


def check_writable(block: nn.Module, offload_folder: str | None) -> None:
    r"""Raises the error [`onloaded`] would raise after pruning `block`, before anything is pruned."""
    if offload_folder is not None:
        return
    for module in block.modules():
        for hook in offload_hooks(module):
            loader = getattr(hook.weights_map, "dataset", hook.weights_map)
            if getattr(loader, "save_folder", None) is None and getattr(loader, "index", None):
                prefix = getattr(hook.weights_map, "prefix", "")
                if any(k.startswith(prefix) and "safetensors_file" in v for k, v in loader.index.items()):
                    raise ValueError(
                        f"{prefix.rstrip('.')} is offloaded to disk straight from the checkpoint's safetensors, which "
                        "hfprune never modifies: pass `offload_folder=` (CLI: --offload-folder), a folder for the "
                        "pruned weights of offloaded blocks."
                    )


def module_tensor(module: nn.Module, name: str) -> torch.Tensor:
    r"""`module.<name>` (a direct parameter or buffer), read from the module's offload hook when it is on `meta`."""
    tensor = getattr(module, name)
    if tensor.device.type != "meta":
        return tensor.detach()
    for hook in offload_hooks(module):
        return hook.weights_map[name]
    raise ValueError(f"{type(module).__name__}.{name} is on the meta device and no offload hook holds its value.")


def read_parameter(model: nn.Module, name: str) -> torch.Tensor:
    r"""The value of parameter `name` of `model`, read through its offload hook when it is on `meta`."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    tensor = getattr(module, leaf)
    if tensor.device.type != "meta":
        return tensor.detach()
    parts = module_name.split(".") if module_name else []
    for depth in range(len(parts), -1, -1):  # the innermost module with an offload hook
        owner = model.get_submodule(".".join(parts[:depth])) if depth else model
        for hook in offload_hooks(owner):
            key = ".".join([*parts[depth:], leaf])
            if key in hook.weights_map:
                return hook.weights_map[key]
    raise ValueError(f"{name} is on the meta device and no offload hook holds its value.")


def _offloaded_tensors(module: nn.Module, hook) -> list[str]:
    recurse = getattr(hook, "place_submodules", False)
    tensors = list(module.named_parameters(recurse=recurse))
    if getattr(hook, "offload_buffers", False):
        tensors += list(module.named_buffers(recurse=recurse))
    return [n for n, t in tensors if t.device.type == "meta"]


def _get(module: nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


def _set(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    r"""Replaces a parameter or buffer by `value` (`None`: an empty `meta` tensor of the same shape and dtype)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    old = getattr(owner, leaf)
    new = value if value is not None else torch.empty_like(old, device="meta")
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(new, requires_grad=old.requires_grad)
    else:
        owner._buffers[leaf] = new


def _write_back(weights_map, name: str, value: torch.Tensor, offload_folder: str | None) -> None:
    from accelerate.utils import offload_weight

    prefix = getattr(weights_map, "prefix", "")
    loader = getattr(weights_map, "dataset", weights_map)
    key = f"{prefix}{name}"
    value = value.to("cpu").contiguous()
    state_dict = loader if isinstance(loader, dict) else getattr(loader, "state_dict", None)
    if isinstance(state_dict, dict) and key in state_dict:  # CPU offload: a state dict in memory
        state_dict[key] = value
        return
    index = getattr(loader, "index", None)
    if index is None or key not in index:
        raise ValueError(f"cannot write the pruned {key} back: its offload map is of an unknown kind.")
    folder = getattr(loader, "save_folder", None)
    if folder is None:
        if offload_folder is None:
            raise ValueError(
                f"{key} is offloaded to disk and read from the checkpoint's own safetensors file, which hfprune never "
                "modifies: pass `offload_folder=` (a folder for the pruned weights of offloaded blocks)."
            )
        os.makedirs(offload_folder, exist_ok=True)
        loader.save_folder = folder = offload_folder
    offload_weight(value, key, folder, index=index)  # updates the index entry: dtype and shape of the .dat file
    index[key].pop("safetensors_file", None)
    index[key].pop("weight_name", None)


def streaming_device_map(model: nn.Module, blocks_path: str, num_blocks: int) -> dict[str, str]:
    r"""A `device_map` for pruning `model` (built on `meta` for this) straight from its checkpoint: every decoder
    block on `"disk"` (read from the checkpoint when used), and so are the input embeddings and the output head unless
    they share their weight (tied embeddings stay on `"cpu"`: accelerate cannot offload one tensor to two places);
    the rest (final norm, rotary tables) on `"cpu"`."""
    device_map: dict[str, str] = {f"{blocks_path}.{i}": "disk" for i in range(num_blocks)}
    on_disk = _untied_embeddings(model)
    parts = blocks_path.split(".")
    module, prefix = model, ""
    for depth, part in enumerate(parts):
        for name, _ in module.named_children():
            if name != part:
                device_map[f"{prefix}{name}"] = "disk" if f"{prefix}{name}" in on_disk else "cpu"
        for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            device_map[f"{prefix}{name}"] = "cpu"
        module, prefix = getattr(module, part), f"{prefix}{part}."
        if depth == len(parts) - 1:
            break
    return device_map


def _untied_embeddings(model: nn.Module) -> set[str]:
    r"""Module names of the input embeddings and the output head, when each has a weight of its own."""
    getters = [getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)]
    found = [g() for g in getters if g is not None]
    found = [m for m in found if isinstance(m, nn.Module) and isinstance(getattr(m, "weight", None), torch.Tensor)]
    if len(found) == 2 and found[0].weight is found[1].weight:
        return set()
    names = {id(m): name for name, m in model.named_modules()}
    return {names[id(m)] for m in found if id(m) in names}


def release_freed_memory() -> None:
    r"""Hands the heap pages of freed tensors back to the operating system (glibc only; elsewhere a no-op).

    glibc serves allocations below its mmap threshold (up to 32 MiB) from the heap and keeps freed pages there, so
    without this every onloaded-and-dropped block leaves part of its weights in the resident set."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None
