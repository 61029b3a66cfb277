"""Count memory by tensor storage: activations saved for backward, weights, gradients and optimizer state.

Everything here counts *storages*, not tensors: a view, a reshape or a second reference to the same memory is
counted once, with the full size of the storage it keeps alive (a small slice of a big tensor keeps the whole of
it). Storages are keyed by (device, data pointer), so the count is exact while the counted tensors are alive.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.nn as nn

from lit_model.quantize import logical_numel

StorageKey = tuple[str, int]


def storage_key(tensor: torch.Tensor) -> StorageKey:
    """The identity of the memory a tensor lives in: (device, data pointer of its untyped storage)."""
    return str(tensor.device), tensor.untyped_storage().data_ptr()


def storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the whole storage behind `tensor` (for a view, the memory it keeps alive, not its own numel)."""
    return tensor.untyped_storage().nbytes()


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Total bytes of the distinct storages behind `tensors` (views and repeats of one storage count once)."""
    seen: dict[StorageKey, int] = {}
    for t in tensors:
        seen.setdefault(storage_key(t), storage_bytes(t))
    return sum(seen.values())


def parameter_storages(*sources: nn.Module | torch.Tensor | Iterable[torch.Tensor]) -> set[StorageKey]:
    """The storage keys of every parameter and buffer of the given modules, and of the given tensors."""
    keys: set[StorageKey] = set()
    for src in sources:
        if isinstance(src, nn.Module):
            tensors: Iterable[torch.Tensor] = [*src.parameters(), *src.buffers()]
        elif isinstance(src, torch.Tensor):
            tensors = [src]
        else:
            tensors = src
        for t in tensors:
            keys.add(storage_key(t))
            keys.update(storage_key(q) for q in _quant_state_tensors(t))
    return keys


@dataclass
class SavedTensorBytes:
    """What `saved_tensor_bytes` counted: distinct storages saved for backward, in bytes, in total and per device."""

    excluded: set[StorageKey] = field(default_factory=set)
    storages: dict[StorageKey, int] = field(default_factory=dict)
    n_saved: int = 0  # every save, including repeats and excluded tensors

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def by_device(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (device, _), n in self.storages.items():
            out[device] = out.get(device, 0) + n
        return out

    def _record(self, tensor: torch.Tensor) -> None:
        self.n_saved += 1
        base = tensor._base if tensor._base is not None else tensor  # a transposed weight is a view of it
        if isinstance(base, nn.Parameter) or (base.is_leaf and base.requires_grad):
            return  # a parameter (or a leaf input standing in for one): not activation memory
        key = storage_key(tensor)
        if key not in self.excluded:
            self.storages.setdefault(key, storage_bytes(tensor))


@contextmanager
def saved_tensor_bytes(*exclude: nn.Module | torch.Tensor | Iterable[torch.Tensor]) -> Iterator[SavedTensorBytes]:
    """Count the bytes autograd saves for backward inside the `with` block (wrap the forward only).

    Excluded: `nn.Parameter`s (bitsandbytes' `Params4bit` included), leaf tensors that require grad, views of those
    (linear layers save the transposed weight), and any tensor
    whose storage is a parameter's or buffer's storage of the modules (or one of the tensors) passed in `exclude`,
    e.g. the weight a linear layer saves after a dtype-preserving view or transpose. Each storage counts once.

    Example::

        with saved_tensor_bytes(model) as saved:
            loss = model(x).sum()
        print(saved.bytes, saved.by_device())

    Tensors a custom `autograd.Function` keeps on `ctx` instead of `save_for_backward` are invisible to the hooks;
    the Functions of this package save through `save_for_backward` so that they are counted.
    """
    counter = SavedTensorBytes(excluded=parameter_storages(*exclude))

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        counter._record(tensor)
        return tensor

    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield counter


def model_memory(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict[str, int]:
    """Bytes held by a model and its optimizer, each storage counted once.

    Keys: "weights" (parameters, with a 4-bit parameter's quantization state), "buffers", "gradients" (`.grad` of the
    model's parameters and of any extra tensors the optimizer steps), "optimizer_state" (tensors in
    `optimizer.state`, plus tensors the optimizer steps that are not the model's parameters, such as the fp32
    master copy of a block optimizer), and "total" (the sum; a storage shared by two categories counts once there).
    """
    params = list(model.parameters())
    param_keys = {storage_key(p) for p in params}
    weights = [*params, *(q for p in params for q in _quant_state_tensors(p))]
    buffers = [b for b in model.buffers() if storage_key(b) not in param_keys]
    grads = [p.grad for p in params if p.grad is not None]
    state: list[torch.Tensor] = []
    if optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if storage_key(p) not in param_keys:
                    state.append(p)
                    if p.grad is not None:
                        grads.append(p.grad)
        state.extend(_nested_tensors(list(optimizer.state.values())))
    return {
        "weights": tensor_bytes(weights),
        "buffers": tensor_bytes(buffers),
        "gradients": tensor_bytes(grads),
        "optimizer_state": tensor_bytes(state),
        "total": tensor_bytes([*weights, *buffers, *grads, *state]),
    }


def _nested_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Tensors inside nested dicts, lists and tuples (an optimizer's state)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _nested_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _nested_tensors(value)


def _quant_state_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes 4-bit parameter's `quant_state` (absmax, code, and the nested state's), if any.

    Duck-typed so that this module needs no bitsandbytes import: the 4-bit weight alone understates its memory.
    """
    out: list[torch.Tensor] = []
    state = getattr(tensor, "quant_state", None)
    depth = 0
    while state is not None and depth < 4:  # QuantState nests at most once (`state2`); the bound guards cycles
        out.extend(v for v in getattr(state, "__dict__", {}).values() if isinstance(v, torch.Tensor))
        state = getattr(state, "state2", None)
        depth += 1
    return out


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts its logical (out * in) values, shared ones once."""
    trainable = total = 0
    for p in model.parameters():
        n = logical_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
