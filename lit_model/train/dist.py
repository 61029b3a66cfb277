"""Several processes: Fabric strategies, collectives, whole state dicts from sharded models, and how gradients are
made the same on every rank (`GradSync`: Fabric's own sync, DDP with DropBP's zero-fill, BAdam's all-reduce).

One process needs none of this beyond `FabricSync` (whose calls are then no-ops), `forward_loss` and `unwrap`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist
from lightning.fabric import Fabric
from lightning.fabric.strategies import DDPStrategy, FSDPStrategy
from torch.distributed.fsdp import (
    FullOptimStateDictConfig,
    FullStateDictConfig,
    FullyShardedDataParallel,
    StateDictType,
)
from torch.nn.parallel import DistributedDataParallel

from lit_model.config import Config
from lit_model.dropbp import DropBPHandler, dropped_parameters
from lit_model.loss import head_loss
from lit_model.model import GPT, Block, DropMask
from lit_model.train.args import FinetuneJob

class LossInForward(torch.nn.Module):
    """The GPT with its loss computed inside one forward: the root module FSDP wraps.

    FSDP gathers a unit's weights for the unit's forward (and again for its backward) only, so the LM head, which the
    chunked loss applies itself, must run inside the root's forward. Without `target` this is the GPT's forward
    (logits or hidden states), for validation and generation; `config` and the KV-cache methods pass through.
    """

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt

    @property
    def config(self) -> Config:
        return self.gpt.config

    def set_kv_cache(self, *args: Any, **kwargs: Any) -> None:
        self.gpt.set_kv_cache(*args, **kwargs)

    def clear_kv_cache(self) -> None:
        self.gpt.clear_kv_cache()

    def forward(
        self, idx: torch.Tensor, input_pos: Optional[torch.Tensor] = None, drop_mask: Any = None,
        return_hidden: bool = False, target: Optional[torch.Tensor] = None, segments: Optional[list[int]] = None,
    ) -> torch.Tensor:
        """Mean cross-entropy over the labels of `target` (B, T) that are not IGNORE_INDEX; without it, GPT's output."""
        if target is None:
            return self.gpt(idx, input_pos, drop_mask, return_hidden, segments)
        hidden = self.gpt(idx, drop_mask=drop_mask, return_hidden=True, segments=segments)
        return head_loss(self.gpt.lm_head, hidden, target)


def unwrap(model: Any) -> GPT:
    """The GPT inside Fabric's wrapper (and inside `LossInForward` under FSDP)."""
    module = model.module
    return module.gpt if isinstance(module, LossInForward) else module



def forward_loss(
    fabric: Any, model: Any, input_ids: torch.Tensor, target: torch.Tensor, drop_mask: Any = None,
    segments: Optional[list[int]] = None,
) -> torch.Tensor:
    """One micro-batch's mean cross-entropy through Fabric's wrapper (inside the forward for `LossInForward`);
    `segments`: the lengths of packed samples (lit_model.data.sft.collate_packed)."""
    if isinstance(model.module, LossInForward):
        return model(input_ids, drop_mask=drop_mask, target=target, segments=segments)
    hidden = model(input_ids, drop_mask=drop_mask, return_hidden=True, segments=segments)
    with fabric.autocast():  # the head's matmuls in the mixed-precision dtype, as inside the model
        return head_loss(model.module.lm_head, hidden, target)




# ---- gradient synchronisation ---------------------------------------------------------------------------------------


class GradSync(Protocol):
    """How the gradients of one optimizer step become the same on every rank: the loop calls `micro_batch` around
    each micro-batch's forward and backward, `before_backward` on its loss, and `end_step` once after the last."""

    def micro_batch(self, last: bool) -> AbstractContextManager: ...

    def before_backward(self, loss: torch.Tensor, mask: Optional[DropMask], last: bool) -> torch.Tensor: ...

    def end_step(self, synced: bool) -> None: ...


class FabricSync:
    """Fabric's DDP or FSDP (or one process): the ranks' gradients are averaged during the backward of a step's last
    micro-batch; the others skip the sync. When the last micro-batch had no backward (every branch dropped, nothing
    trainable reached), the step's gradients are averaged here instead."""

    def __init__(self, fabric: Fabric, model: Any, optimizer: Any) -> None:
        self.fabric, self.model, self.optimizer = fabric, model, optimizer

    def micro_batch(self, last: bool) -> AbstractContextManager:
        return self.fabric.no_backward_sync(self.model, enabled=not last)

    def before_backward(self, loss: torch.Tensor, mask: Optional[DropMask], last: bool) -> torch.Tensor:
        return loss

    def end_step(self, synced: bool) -> None:
        if self.fabric.world_size > 1 and not synced:
            # Needs DropBP, which FSDP refuses (lit_model.train.args.distributed_problems).
            assert not is_fsdp(self.fabric), "FSDP skipped the backward of a step's last micro-batch"
            all_reduce_gradients(self.fabric, optimizer_params(self.optimizer))


class ZeroFillSync:
    """DDP with DropBP: DDP's reducer waits for a gradient of every parameter, so in the synchronising micro-batch
    the branches DropBP dropped get zero gradients (a zero-valued term of the loss); those dropped in every micro-batch
    of the step get no gradient again afterwards, as on one device (AdamW then skips them)."""

    def __init__(self, inner: FabricSync, model: GPT) -> None:
        self.inner, self.model = inner, model
        self.never_reached: Optional[dict[int, torch.nn.Parameter]] = None

    def micro_batch(self, last: bool) -> AbstractContextManager:
        return self.inner.micro_batch(last)

    def before_backward(self, loss: torch.Tensor, mask: Optional[DropMask], last: bool) -> torch.Tensor:
        if mask is None:
            return loss
        dropped = {id(p): p for p in dropped_parameters(self.model, mask)}
        self.never_reached = {k: p for k, p in dropped.items() if self.never_reached is None or k in self.never_reached}
        return loss + zero_gradient_term(list(dropped.values())) if last and dropped else loss

    def end_step(self, synced: bool) -> None:
        self.inner.end_step(synced)
        for p in (self.never_reached or {}).values():
            p.grad = None
        self.never_reached = None


class LoopAllReduceSync:
    """BAdam on several ranks: there is no DDP wrapper (its buckets cannot follow the active block), so the loop
    averages the gradients of the optimizer's tensors after the step's backwards."""

    def __init__(self, fabric: Fabric, optimizer: Any) -> None:
        self.fabric, self.optimizer = fabric, optimizer

    def micro_batch(self, last: bool) -> AbstractContextManager:
        return nullcontext()

    def before_backward(self, loss: torch.Tensor, mask: Optional[DropMask], last: bool) -> torch.Tensor:
        return loss

    def end_step(self, synced: bool) -> None:
        all_reduce_gradients(self.fabric, optimizer_params(self.optimizer))  # BAdam's active block of this step


def optimizer_params(optimizer: Any) -> list[torch.nn.Parameter]:
    """The tensors the optimizer steps now (BAdam's change with the active block)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def make_grad_sync(fabric: Fabric, model: Any, optimizer: Any, job: FinetuneJob,
                   dropbp: Optional[DropBPHandler]) -> GradSync:
    """The sync the job needs: BAdam on several ranks all-reduces in the loop; DDP (also with one process) with
    DropBP zero-fills; everything else is Fabric's."""
    if fabric.world_size > 1 and job.optimizer != "adamw":
        return LoopAllReduceSync(fabric, optimizer)
    inner = FabricSync(fabric, model, optimizer)
    if isinstance(model._forward_module, DistributedDataParallel) and dropbp is not None:
        return ZeroFillSync(inner, unwrap(model))
    return inner


# ---- strategies -----------------------------------------------------------------------------------------------------


def make_strategy(job: FinetuneJob) -> Any:
    """Fabric's strategy for the job: one device, DDP, FSDP (each `Block` one unit), or BAdam's own gradient sync.

    - DDP (`auto` on several devices): `find_unused_parameters=False` even with DropBP; the loop gives the branches
      DropBP dropped zero gradients in the synchronising micro-batch instead (docs/distributed.md has the numbers).
    - FSDP: full sharding, one unit per `Block`, `use_orig_params` (LoRA mixes frozen and trainable tensors in a
      unit); checkpoints gather full state dicts, so their format does not change.
    - BAdam (--optimizer badam/badam_ratio): the DDP processes without the DDP wrapper; the loop all-reduces the
      gradients of the optimizer's tensors (the active block's, or the selected entries), nothing else.
    """
    if job.world_size == 1 and job.strategy == "auto":
        return "auto"
    if job.optimizer != "adamw":
        return LoopSyncedDDPStrategy()
    if job.strategy == "fsdp":
        return _fsdp_strategy()
    # gradient_as_bucket_view: gradients live in DDP's communication buckets, no second copy.
    return DDPStrategy(find_unused_parameters=False, gradient_as_bucket_view=True)


def strategy_name(job: FinetuneJob) -> str:
    """How the job runs on several processes, in words."""
    if job.optimizer != "adamw":
        return "data parallel with BAdam's gradients all-reduced by the loop"
    return "FSDP (full sharding, one unit per block)" if job.strategy == "fsdp" else "DDP"


def _fsdp_strategy() -> Any:
    kwargs: dict[str, Any] = dict(auto_wrap_policy={Block}, sharding_strategy="FULL_SHARD", state_dict_type="full",
                                  use_orig_params=True)
    return FSDPStrategy(**kwargs) if torch.cuda.is_available() else CPUFSDPStrategy(**kwargs)


class CPUFSDPStrategy(FSDPStrategy):
    """FSDP on CPU processes (gloo), which torch supports but Lightning refuses: only for tests and debugging.

    Lightning rejects the FSDPStrategy *type* on CPU and passes FSDP no device, which torch then looks for on an
    accelerator; naming the CPU device is all it takes. The training code paths are those of the GPU strategy.
    """

    def setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return FullyShardedDataParallel(
            module, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self._fsdp_kwargs,
        )


class LoopSyncedDDPStrategy(DDPStrategy):
    """DDP's processes and collectives, without the DDP wrapper: BAdam changes which parameters train every K steps,
    which DDP's buckets (built once, over the parameters requiring grad at wrap time) cannot follow, and its
    fp32-master hooks take the gradients before DDP's reducer would. The loop all-reduces instead."""

    def setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return module


def is_fsdp(fabric: Any) -> bool:
    """Whether the model is sharded with FSDP."""
    return isinstance(fabric.strategy, FSDPStrategy)


def global_sum(fabric: Any, values: list[int]) -> list[int]:
    """Integers summed over all ranks (one all-reduce); unchanged on one process."""
    if fabric.world_size == 1:
        return values
    total = fabric.all_reduce(torch.tensor(values, dtype=torch.int64, device=fabric.device), reduce_op="sum")
    return [int(v) for v in total.tolist()]


def zero_gradient_term(params: list[torch.Tensor]) -> torch.Tensor:
    """0 in value, with a zero gradient for every tensor in `params` (one element read from each)."""
    return torch.stack([p.reshape(-1)[0].float() for p in params]).sum() * 0.0


def all_reduce_gradients(fabric: Any, tensors: list[torch.Tensor]) -> None:
    """Average the gradients of `tensors` over all ranks, in place: one flat all-reduce per dtype and device.

    Every rank must hold gradients for the same tensors (DropBP's masks are the same on all ranks).
    """
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        if t.grad is not None:
            groups.setdefault((t.grad.dtype, t.grad.device), []).append(t.grad)
    for grads in groups.values():
        flat = fabric.all_reduce(torch.cat([g.reshape(-1) for g in grads]), reduce_op="mean")
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def gather_objects(fabric: Any, obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order (on every rank)."""
    if fabric.world_size == 1:
        return [obj]
    out: list[Any] = [None] * fabric.world_size
    dist.all_gather_object(out, obj)
    return out


def check_same_on_all_ranks(fabric: Any, value: Any, what: str) -> None:
    """Raise on every rank if `value` differs between ranks (a cheap guard against silently diverging ranks)."""
    if fabric.world_size == 1:
        return
    values = gather_objects(fabric, value)
    different = [r for r, v in enumerate(values) if v != values[0]]
    if different:
        raise RuntimeError(f"{what} differ between rank 0 and rank(s) {different}: the ranks no longer train the same "
                           "model. Every rank must run the same code, seed and arguments.")


def model_state_dict(fabric: Any, model: Any) -> dict[str, torch.Tensor]:
    """The unwrapped model's plain state dict; under FSDP gathered whole (collective; complete on rank 0)."""
    if not is_fsdp(fabric):
        return model.module.state_dict()
    with FullyShardedDataParallel.state_dict_type(model._forward_module, StateDictType.FULL_STATE_DICT,
                                                  _full_state_config(fabric)):
        state = model._forward_module.state_dict()
    return {k.removeprefix("gpt."): v for k, v in state.items()}  # LossInForward's attribute: the GPT's own keys


def _full_state_config(fabric: Any, optim: bool = False, loading: bool = False) -> Any:
    # On a GPU: gathered into CPU memory of rank 0 only. On CPU processes (tests) torch's CPU offload of a CPU tensor
    # crashes (segfault, torch 2.13), and there is nothing to offload: every rank gathers. When loading, every rank
    # has read the whole file itself.
    on_gpu = fabric.device.type != "cpu"
    cls = FullOptimStateDictConfig if optim else FullStateDictConfig
    return cls(offload_to_cpu=on_gpu, rank0_only=on_gpu and not loading)


def optimizer_state(fabric: Any, model: Any, optimizer: Any) -> dict[str, Any]:
    """The optimizer's state dict in torch's single-process format; under FSDP gathered whole (collective).

    FSDP's full optimizer state is keyed by parameter names; re-keyed by position in the optimizer's parameter list,
    it is exactly what the same optimizer on one device saves, so checkpoints resume on any number of devices.
    """
    if not is_fsdp(fabric):
        return optimizer.state_dict()
    fsdp = model._forward_module
    with FullyShardedDataParallel.state_dict_type(fsdp, StateDictType.FULL_STATE_DICT, _full_state_config(fabric),
                                                  _full_state_config(fabric, optim=True)):
        named = FullyShardedDataParallel.optim_state_dict(fsdp, optimizer.optimizer)
    if "param_groups" not in named:  # gathered on rank 0 only: the other ranks do not save
        return {}
    order = [name for group in named["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    return {"state": {index[name]: v for name, v in named["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]}


def load_optimizer_state(fabric: Any, model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Load `optimizer_state`'s format; under FSDP every rank takes its shard of the whole state."""
    if fabric is None or not is_fsdp(fabric):
        optimizer.load_state_dict(state)
        return
    fsdp = model._forward_module
    # The names of the optimizer's parameters, in its order, as FSDP's full state dicts spell them.
    names = {id(p): clean_name(n) for n, p in fsdp.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.optimizer.param_groups]
    order = [n for g in groups for n in g]
    named = {"state": {order[int(i)]: v for i, v in state["state"].items()},
             "param_groups": [{**g, "params": names_g} for g, names_g in zip(state["param_groups"], groups)]}
    with FullyShardedDataParallel.state_dict_type(fsdp, StateDictType.FULL_STATE_DICT,
                                                  _full_state_config(fabric, loading=True),
                                                  _full_state_config(fabric, optim=True, loading=True)):
        sharded = FullyShardedDataParallel.optim_state_dict_to_load(fsdp, optimizer.optimizer, named)
    optimizer.optimizer.load_state_dict(sharded)


def clean_name(name: str) -> str:
    """A parameter name without the wrappers' path components (FSDP units, checkpoint wrappers)."""
    for part in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(part, "")
    return name
