"""BAdam (arXiv 2404.02827): block coordinate descent with Adam as the inner solver, on torch alone.

`BlockOptimizer` trains one block of parameters at a time (by default one transformer block): only that block
requires grad, a float32 master copy of its low-precision weights is what the wrapped optimizer steps, and after
`switch_block_every` steps the next block takes over with a fresh optimizer state. Weights stay in bf16/fp16; the
fp32 copy, its gradient and Adam's two moments exist for the active block only: 2M + 16M/D bytes instead of 18M.

`BlockOptimizerRatio` trains every parameter at once, but only an `update_ratio` share of its entries at a time;
gradients, fp32 master values and Adam moments are kept for the selected entries only, as dense vectors.

Re-implemented from the paper and from reading the authors' package `badam` 1.4 (the test oracle; no code copied).
Where we differ from that package, on purpose:

- Every visit of a block lasts exactly `switch_block_every` steps (the package's first visit is one step short).
- Active parameters that got no gradient this step (a branch DropBP dropped) are skipped: no update, no state
  change. The package asserts that every active parameter has a gradient.
- Biases get no weight decay (`no_decay=("bias",)`), which is what the package intends; its groups are built as
  `{"weight_decay": 0.0, **defaults}`, so the optimizer's default weight decay overrides the 0.0 and biases decay
  too. `no_decay=()` reproduces that. Norm weights decay in both: the package's norm exemption tests whether a
  *parameter* is a LayerNorm *module*, which is never true.
- Low-precision gradients move into the fp32 masters as they are produced (a post-accumulate-grad hook), so
  gradient accumulation sums in fp32, the bf16 gradient is freed at once, and gradient clipping over the optimizer's
  parameters (what Fabric's `clip_gradients` does) sees the gradients. fp32 weights are stepped in place (a
  copy would change no number and cost memory); either way `step()` consumes the gradients, as in the package.
- `state_dict()` holds the block order, position, step counters, the RNG and the fp32 masters, so a resumed run
  continues exactly; the package saves the inner optimizer's state only.
- BlockOptimizerRatio: see its docstring.

On several devices the model is not wrapped in DDP (its gradient buckets, built once over the parameters that
require grad, could not follow the block switches): the training loop all-reduces the gradients this optimizer
steps instead (see `lit_model.train.dist`).
"""

from __future__ import annotations

import logging
import math
import re
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch.optim import Optimizer

logger = logging.getLogger(__name__)

SWITCH_MODES = ("random", "ascending", "descending")
MASK_MODES = ("adjacent", "scatter")
EMBEDDING_PREFIX = "transformer.wte."
LM_HEAD_PREFIX = "lm_head."
# The prefix of a transformer block's parameters, wherever a wrapper put our GPT ("_forward_module.transformer.h.3.").
_BLOCK_PATTERN = re.compile(r"^(.*?transformer\.h\.(\d+)\.)")
# Weights in these dtypes get an fp32 master copy; wider ones are stepped in place.
LOW_PRECISION = (torch.float16, torch.bfloat16)

NamedParameters = Iterable[tuple[str, torch.Tensor]]


def default_switch_every(n_samples: int, batch_size: int, n_blocks: int, minimum: int = 50) -> int:
    """K = max(ceil(n / (B * D)), minimum): steps per block visit so that one round over the D blocks sees the data.

    batch_size is the number of samples per optimizer step (micro-batch x accumulation x devices).
    """
    for name, value in (("n_samples", n_samples), ("batch_size", batch_size), ("n_blocks", n_blocks)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(minimum, int) or minimum < 1:
        raise ValueError(f"minimum must be a positive integer, got {minimum!r}")
    return max(math.ceil(n_samples / (batch_size * n_blocks)), minimum)


def default_block_prefixes(
    names: Sequence[str], include_embedding: bool = False, include_lm_head: bool = False
) -> list[list[str]]:
    """One block per transformer block of our GPT (`transformer.h.{i}.`), in depth order.

    include_embedding adds `transformer.wte.` as the first block; include_lm_head adds the LM head together with the
    other parameters outside the transformer blocks (the final norm) as the last block, as the reference does.
    """
    blocks: dict[int, str] = {}
    embedding: list[str] = []
    others: list[str] = []
    for name in names:
        match = _BLOCK_PATTERN.match(name)
        if match:
            blocks.setdefault(int(match.group(2)), match.group(1))
        elif EMBEDDING_PREFIX in name:
            prefix = name[: name.index(EMBEDDING_PREFIX) + len(EMBEDDING_PREFIX)]
            if prefix not in embedding:
                embedding.append(prefix)
        else:
            others.append(name)  # full names: a name is a substring of itself and of nothing else here
    prefixes = [[blocks[i]] for i in sorted(blocks)]
    if not prefixes:
        raise ValueError(
            "found no transformer blocks (parameter names containing 'transformer.h.<i>.'); "
            "pass block_prefix_list to say which parameters form each block"
        )
    if include_embedding and embedding:
        prefixes.insert(0, embedding)
    if include_lm_head and others:
        prefixes.append(others)
    return prefixes


def _is_bias(name: str, no_decay: Sequence[str]) -> bool:
    return any(s in name for s in no_decay)


def _hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def _load_state_in_place(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
    """`Optimizer.load_state_dict`, but keeping the existing `param_groups` dicts and `state` dict objects.

    The wrapped optimizer and Fabric's optimizer wrapper hold references to them; torch's loader replaces both.
    """
    groups, state = optimizer.param_groups, optimizer.state
    Optimizer.load_state_dict(optimizer, state_dict)
    for group, loaded in zip(groups, optimizer.param_groups):
        group.clear()
        group.update(loaded)
    loaded_state = dict(optimizer.state)
    state.clear()
    state.update(loaded_state)
    optimizer.param_groups, optimizer.state = groups, state


class BlockOptimizer(Optimizer):
    """Wrap `base_optimizer` (e.g. AdamW) to train one block of parameters at a time (BAdam).

    base_optimizer: built over the model's parameters with one set of hyper-parameters; its parameter groups are
        replaced by two groups over the active block (weights with weight decay, `no_decay` names without).
    named_parameters_list: `list(model.named_parameters())`.
    block_prefix_list: the blocks, each a list of name substrings (a plain string is a one-prefix block). Default:
        `default_block_prefixes(...)`, one block per transformer block. Parameters in no block and not matching
        `active_modules` stay frozen.
    switch_block_every: K, Adam steps per block visit (see `default_switch_every`).
    start_block: index of the first block (default: 0 ascending, the last descending, random in random mode).
    switch_mode: "ascending", "descending", or "random" (a fresh random permutation of the blocks every round; the
        package's default is "descending").
    active_modules: name substrings of parameters that train the whole time (their state restarts at each switch,
        as in the reference).
    include_embedding, include_lm_head: add the embedding / LM head (with the final norm) as extra default blocks.
    no_decay: name substrings of parameters without weight decay.
    verbose: 0 silent, 1 one log line (logger `lit_model.badam`, INFO) per switch, 2 also the parameter names.
    seed: seeds the random block order (default: drawn from torch's global RNG).

    `step()` steps the active block, consumes its gradients and switches blocks after K steps. LR schedulers work
    on `param_groups` as usual: the two groups stay the same dicts across switches, only their "params" change.
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        named_parameters_list: NamedParameters,
        block_prefix_list: Optional[Sequence[Sequence[str] | str]] = None,
        switch_block_every: int = 50,
        start_block: Optional[int] = None,
        switch_mode: str = "random",
        active_modules: Sequence[str] = (),
        include_embedding: bool = False,
        include_lm_head: bool = False,
        no_decay: Sequence[str] = ("bias",),
        verbose: int = 1,
        seed: Optional[int] = None,
    ) -> None:
        if not isinstance(base_optimizer, Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        named = list(named_parameters_list)
        if not named:
            raise ValueError("named_parameters_list is empty: pass list(model.named_parameters())")
        if switch_mode not in SWITCH_MODES:
            raise ValueError(f"switch_mode must be one of {SWITCH_MODES}, got {switch_mode!r}")
        if isinstance(switch_block_every, bool) or not isinstance(switch_block_every, int) or switch_block_every < 1:
            raise ValueError(f"switch_block_every must be a positive integer, got {switch_block_every!r}")
        if isinstance(active_modules, str):
            active_modules = [active_modules]
        if isinstance(no_decay, str):
            no_decay = [no_decay]
        names = [n for n, _ in named]
        if block_prefix_list is None:
            prefixes = default_block_prefixes(names, include_embedding, include_lm_head)
        else:
            if include_embedding or include_lm_head:
                raise ValueError(
                    "include_embedding/include_lm_head apply to the default blocks only; with block_prefix_list, "
                    "add the embedding or LM head prefixes to it as blocks of their own"
                )
            prefixes = [[b] if isinstance(b, str) else list(b) for b in block_prefix_list]
        members = self._block_members(names, prefixes)
        always = self._matching(names, list(active_modules), "active_modules")
        if start_block is not None and not 0 <= start_block < len(prefixes):
            raise ValueError(f"start_block must be in [0, {len(prefixes)}), got {start_block}")
        hyper = [_hyperparameters(g) for g in base_optimizer.param_groups]
        if any(h != hyper[0] for h in hyper[1:]):
            raise ValueError(
                "base_optimizer has parameter groups with different hyper-parameters; BlockOptimizer builds its own "
                "groups (weight decay or not): build the base optimizer over model.parameters() in one group"
            )

        self.base_optimizer = base_optimizer
        self.named_parameters_list = named
        self.block_prefix_list = prefixes
        self.switch_block_every = switch_block_every
        self.switch_mode = switch_mode
        self.active_modules = list(active_modules)
        self.no_decay = list(no_decay)
        self.verbose = verbose
        self._members = members
        self._always = always
        self._start = start_block
        self._generator = torch.Generator()
        self._generator.manual_seed(int(torch.randint(2**62, ())) if seed is None else seed)
        self._masters: dict[int, torch.Tensor] = {}  # parameter index -> fp32 master of a low-precision weight
        self._hooks: list[Any] = []
        self.global_step = 0
        self.steps_in_block = 0

        groups = [
            {**hyper[0], "params": []},
            {**hyper[0], "params": [], **({"weight_decay": 0.0} if "weight_decay" in hyper[0] else {})},
        ]
        super().__init__(groups, base_optimizer.defaults)
        # One set of groups and one state dict, shared with the base optimizer for good: a scheduler's lr lands
        # directly in the groups that are stepped, and nothing ever rebinds them (Fabric's wrapper holds them too).
        self.state.clear()
        base_optimizer.param_groups = self.param_groups
        base_optimizer.state = self.state
        self.block_order = self._new_round(first=True)
        self.position = 0
        self._activate(self.block_order[0])

    @property
    def n_blocks(self) -> int:
        """D, the number of blocks."""
        return len(self.block_prefix_list)

    @property
    def current_block(self) -> int:
        """Index (into `block_prefix_list`) of the block being trained."""
        return self.block_order[self.position]

    @property
    def trainable_names(self) -> list[str]:
        """Names of the parameters trained now: the active block and the `active_modules`."""
        return [n for n, p in self.named_parameters_list if p.requires_grad]

    @staticmethod
    def _matching(names: list[str], substrings: list[str], what: str) -> set[int]:
        found: set[int] = set()
        for s in substrings:
            hits = {i for i, n in enumerate(names) if s in n}
            if not hits:
                raise ValueError(f"{what} entry {s!r} matches no parameter name (names look like {names[:3]})")
            found |= hits
        return found

    @classmethod
    def _block_members(cls, names: list[str], prefixes: list[list[str]]) -> list[list[int]]:
        if not prefixes:
            raise ValueError("block_prefix_list is empty: give at least one block of parameter name prefixes")
        members: list[list[int]] = []
        owner: dict[int, int] = {}
        for b, block in enumerate(prefixes):
            if not block:
                raise ValueError(f"block {b} of block_prefix_list is empty: give it at least one name prefix")
            hits = cls._matching(names, block, f"block {b} prefix")
            for i in hits:
                if i in owner:
                    raise ValueError(
                        f"parameter {names[i]!r} is in blocks {owner[i]} and {b}: blocks must not overlap "
                        "(end each prefix with '.', e.g. 'transformer.h.1.' rather than 'transformer.h.1')"
                    )
                owner[i] = b
            members.append(sorted(hits))
        return members

    def _new_round(self, first: bool = False) -> list[int]:
        """The block order of the next round: every block once."""
        d = self.n_blocks
        if self.switch_mode == "random":
            order = torch.randperm(d, generator=self._generator).tolist()
            if first and self._start is not None:
                order.remove(self._start)
                order.insert(0, self._start)
            return order
        if self.switch_mode == "ascending":
            start = 0 if self._start is None else self._start
            return [(start + i) % d for i in range(d)]
        start = d - 1 if self._start is None else self._start
        return [(start - i) % d for i in range(d)]

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _grad_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        """Move a low-precision weight's gradient into its fp32 master as soon as autograd has accumulated it."""
        owner = weakref.ref(self)  # a discarded optimizer must not keep its masters alive through the model

        def hook(param: torch.Tensor) -> None:
            opt = owner()
            master = None if opt is None else opt._masters.get(index)
            if master is None or param.grad is None:
                return
            grad = param.grad.float()
            if master.grad is None:
                master.grad = grad
            else:
                master.grad.add_(grad)
            param.grad = None

        return hook

    def _activate(self, block: int, log: bool = True) -> None:
        """Make `block` (plus the active modules) the only trainable parameters, with fresh masters and state."""
        self._remove_hooks()
        self._masters = {}
        active = set(self._members[block]) | self._always
        decay: list[torch.Tensor] = []
        no_decay: list[torch.Tensor] = []
        for i, (name, p) in enumerate(self.named_parameters_list):
            p.grad = None
            p.requires_grad_(i in active)
            if i not in active:
                continue
            stepped = p
            if p.dtype in LOW_PRECISION:
                stepped = p.detach().float()
                self._masters[i] = stepped
                self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_hook(i)))
            (no_decay if _is_bias(name, self.no_decay) else decay).append(stepped)
        self.param_groups[0]["params"] = decay
        self.param_groups[1]["params"] = no_decay
        self.state.clear()  # each visit starts Adam afresh
        if log and self.verbose >= 1:
            logger.info(
                "BAdam step %d: training block %d/%d %s (%d parameters) for %d steps",
                self.global_step, block + 1, self.n_blocks, self.block_prefix_list[block],
                sum(self.named_parameters_list[i][1].numel() for i in active), self.switch_block_every,
            )
        if log and self.verbose >= 2:
            logger.info("BAdam trainable: %s", [self.named_parameters_list[i][0] for i in sorted(active)])

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One step of the base optimizer on the active block; after K steps, switch to the next block."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped = [i for i, master in self._masters.items() if master.grad is not None]
        self.base_optimizer.step()
        for i in stepped:
            self.named_parameters_list[i][1].copy_(self._masters[i])
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None
        self.global_step += 1
        self.steps_in_block += 1
        if self.steps_in_block >= self.switch_block_every:
            self.steps_in_block = 0
            self.position += 1
            if self.position == len(self.block_order):
                self.block_order = self._new_round()
                self.position = 0
            self._activate(self.current_block)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the model's parameters and of the fp32 masters."""
        tensors = [p for _, p in self.named_parameters_list] + list(self._masters.values())
        for p in tensors:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    def state_dict(self) -> dict[str, Any]:
        """The active block's optimizer state (torch's format), its fp32 masters, and where the schedule stands."""
        out = super().state_dict()
        names = self.named_parameters_list
        out["badam"] = {
            "block_prefix_list": [list(b) for b in self.block_prefix_list],
            "switch_mode": self.switch_mode,
            "block_order": list(self.block_order),
            "position": self.position,
            "steps_in_block": self.steps_in_block,
            "global_step": self.global_step,
            "generator": self._generator.get_state(),
            "masters": {names[i][0]: m for i, m in self._masters.items()},
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a `state_dict()`: load the model's weights first, then this, and training continues exactly."""
        if "badam" not in state_dict:
            raise ValueError("this state dict was not saved by BlockOptimizer (no 'badam' entry)")
        meta = state_dict["badam"]
        if [list(b) for b in meta["block_prefix_list"]] != self.block_prefix_list:
            raise ValueError(
                f"the state dict was saved with blocks {meta['block_prefix_list']}, this optimizer has "
                f"{self.block_prefix_list}: build it with the same block_prefix_list/include_* options"
            )
        if meta["switch_mode"] != self.switch_mode:
            raise ValueError(
                f"the state dict was saved with switch_mode={meta['switch_mode']!r}, not {self.switch_mode!r}"
            )
        self._generator.set_state(meta["generator"])
        self.block_order = [int(b) for b in meta["block_order"]]
        self.position = int(meta["position"])
        self.steps_in_block = int(meta["steps_in_block"])
        self.global_step = int(meta["global_step"])
        self._activate(self.current_block, log=False)
        index = {n: i for i, (n, _) in enumerate(self.named_parameters_list)}
        saved = meta["masters"]
        if set(saved) != {self.named_parameters_list[i][0] for i in self._masters}:
            raise ValueError("the saved fp32 masters do not match the active block's low-precision parameters")
        for name, value in saved.items():
            self._masters[index[name]].copy_(value)
        _load_state_in_place(self, {"state": state_dict["state"], "param_groups": state_dict["param_groups"]})


@dataclass
class _Slot:
    """One parameter of BlockOptimizerRatio and its current selection of entries."""

    name: str
    param: torch.Tensor
    count: int  # entries selected at a time
    seed: int  # scatter mode: seeds this parameter's fixed random order of its entries
    offset: int = 0  # start of the selection in the parameter's (flattened or permuted) order
    index: Optional[torch.Tensor] = None  # scatter mode: the selected flat indices (int64)
    master: Optional[torch.Tensor] = None  # fp32 copy of the selected entries: what the optimizer steps

    @property
    def full(self) -> bool:
        return self.count == self.param.numel()

    def windows(self) -> list[tuple[int, int]]:
        """The selection as (start, end) ranges of the flattened parameter (adjacent mode; wraps around)."""
        n = self.param.numel()
        end = self.offset + self.count
        return [(self.offset, end)] if end <= n else [(self.offset, n), (0, end - n)]

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The selected entries of `tensor` (the parameter or its gradient) as a new fp32 vector."""
        flat = tensor.reshape(-1)
        if self.index is not None:
            return flat.index_select(0, self.index).float()
        return torch.cat([flat[a:b] for a, b in self.windows()]).float()  # cat copies: no view of a dense grad

    def scatter_(self, values: torch.Tensor) -> None:
        """Write `values` (the stepped master) into the selected entries of the parameter."""
        flat = self.param.data.view(-1)
        values = values.to(flat.dtype)
        if self.index is not None:
            flat.index_copy_(0, self.index, values)
            return
        done = 0
        for a, b in self.windows():
            flat[a:b].copy_(values[done : done + b - a])
            done += b - a


class BlockOptimizerRatio(Optimizer):
    """Sparse BAdam: every parameter trains, but only `update_ratio` of its entries at a time.

    param_groups: the parameters (or groups of them, with their own lr/betas/eps/weight_decay) to train; those that
        do not require grad are left alone.
    named_parameters_list: `list(model.named_parameters())`, to name the parameters.
    update_ratio: share of each parameter's entries trained at a time, in (0, 1].
    switch_every: steps between selections; each switch starts Adam afresh on the next selection.
    mask_mode: "adjacent" (a run of consecutive entries of the flattened parameter, i.e. whole rows and a partial
        one, moving on by its own length at each switch, wrapping around) or "scatter" (a fixed random order of the
        entries per parameter, walked the same way).
    lr, betas, eps, weight_decay: Adam's hyper-parameters (defaults for groups that do not set them). The update is
        the reference's (and torch's SparseAdam's): p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps);
        weight decay, if any, is decoupled (p *= 1 - lr * wd) and touches the selected entries only.
    include_embedding, include_lm_head: otherwise `transformer.wte.` / `lm_head.` parameters are frozen.
    preserve_threshold: parameters with fewer entries (norms, biases of tiny models) train all entries.
    seed: seeds the scatter orders (default: drawn from torch's global RNG).

    Memory per selected entry: an fp32 master, its fp32 gradient and two fp32 moments (16 bytes; scatter mode adds
    an 8-byte index), kept as dense vectors. The dense gradient of a parameter exists only while autograd produces
    it: a hook gathers the selected entries into the master's gradient and frees it. Clip gradients over this
    optimizer's parameters (Fabric's `clip_gradients` does): the model's parameters hold no gradients.

    Differences from the reference `badam.BlockOptimizerRatio` (1.4): it keeps the selected gradients as torch
    sparse COO tensors on the parameters and steps the weights in their own dtype (bf16 entries and bf16 moments);
    it caches one mask per parameter *shape* (so equally shaped matrices share one scatter pattern) and draws it
    after reseeding torch's global RNG during backward; it advances the selection inside the backward hook, so with
    gradient accumulation the micro-batches of a switching step use different selections; its small-parameter
    exemption (`preserve_threshold`) falls through to the mask anyway; it finds the embedding by the substring
    "embed" (None for our GPT, where it crashes unless include_embedding=True). In adjacent mode, with
    preserve_threshold=0 and fp32 weights, the two step identical numbers (tested).
    """

    def __init__(
        self,
        param_groups: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        named_parameters_list: NamedParameters,
        update_ratio: float = 0.1,
        switch_every: int = 100,
        mask_mode: str = "adjacent",
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        include_embedding: bool = False,
        include_lm_head: bool = False,
        preserve_threshold: int = 100,
        seed: Optional[int] = None,
        verbose: int = 1,
    ) -> None:
        problems = []
        if isinstance(update_ratio, bool) or not isinstance(update_ratio, (int, float)) or not 0 < update_ratio <= 1:
            problems.append(f"update_ratio must be in (0, 1], got {update_ratio!r}")
        if isinstance(switch_every, bool) or not isinstance(switch_every, int) or switch_every < 1:
            problems.append(f"switch_every must be a positive integer, got {switch_every!r}")
        if mask_mode not in MASK_MODES:
            problems.append(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        if not isinstance(preserve_threshold, int) or preserve_threshold < 0:
            problems.append(f"preserve_threshold must be a non-negative integer, got {preserve_threshold!r}")
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            problems.append(
                f"need lr, eps, weight_decay >= 0 and betas in [0, 1), got {lr}, {eps}, {weight_decay}, {betas}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        named = list(named_parameters_list)
        for name, p in named:
            if (not include_embedding and EMBEDDING_PREFIX in name) or (not include_lm_head and LM_HEAD_PREFIX in name):
                p.requires_grad_(False)
        names = {id(p): n for n, p in named}
        groups_in = list(param_groups)
        if groups_in and isinstance(groups_in[0], torch.Tensor):
            groups_in = [{"params": groups_in}]

        self.update_ratio = float(update_ratio)
        self.switch_every = switch_every
        self.mask_mode = mask_mode
        self.preserve_threshold = preserve_threshold
        self.verbose = verbose
        self.global_step = 0
        self.named_parameters_list = named
        generator = torch.Generator()
        generator.manual_seed(int(torch.randint(2**62, ())) if seed is None else seed)
        self._group_slots: list[list[_Slot]] = []
        groups: list[dict[str, Any]] = []
        for group in groups_in:
            slots = []
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError("a parameter in param_groups is missing from named_parameters_list")
                if not p.requires_grad:
                    continue
                if not p.is_contiguous():
                    raise ValueError(
                        f"parameter {names[id(p)]!r} is not contiguous; BlockOptimizerRatio needs flat views of it"
                    )
                n = p.numel()
                count = n if n < preserve_threshold else max(1, int(n * self.update_ratio))
                slots.append(_Slot(names[id(p)], p, count, int(torch.randint(2**31 - 1, (), generator=generator))))
            self._group_slots.append(slots)
            groups.append({**_hyperparameters(group), "params": []})
        if not any(self._group_slots):
            raise ValueError("BlockOptimizerRatio found no parameter to train (none in param_groups requires grad)")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(groups, defaults)
        self._hooks = [s.param.register_post_accumulate_grad_hook(self._grad_hook(s)) for s in self._slots()]
        self._select()

    def _slots(self) -> list[_Slot]:
        return [s for slots in self._group_slots for s in slots]

    def _grad_hook(self, slot: _Slot) -> Callable[[torch.Tensor], None]:
        """Gather the selected entries of a fresh dense gradient into the master's gradient and free the dense one."""
        owner = weakref.ref(self)

        def hook(param: torch.Tensor) -> None:
            if owner() is None or param.grad is None or slot.master is None:
                return
            grad = slot.gather(param.grad)
            if slot.master.grad is None:
                slot.master.grad = grad
            else:
                slot.master.grad.add_(grad)
            param.grad = None

        return hook

    def remove_hooks(self) -> None:
        """Detach this optimizer from the model's parameters (their gradients then stay dense on them)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _select(self) -> None:
        """(Re)build every parameter's selection at its current offset, with fresh fp32 masters and no state."""
        for group, slots in zip(self.param_groups, self._group_slots):
            for s in slots:
                s.index = None
                if self.mask_mode == "scatter" and not s.full:
                    g = torch.Generator().manual_seed(s.seed)
                    order = torch.randperm(s.param.numel(), generator=g).to(s.param.device)
                    window = torch.cat([order[a:b] for a, b in s.windows()])
                    s.index = window.sort().values  # sorted: memory order for the gathers
                s.master = s.gather(s.param.detach())
            group["params"] = [s.master for s in slots]
        self.state.clear()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One Adam step on the selected entries; every `switch_every` steps, move every selection on."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, slots in zip(self.param_groups, self._group_slots):
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for s in slots:
                master = s.master
                assert master is not None
                if master.grad is None:  # no gradient this step (e.g. a branch dropped by DropBP)
                    continue
                grad = master.grad
                state = self.state[master]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(master)
                    state["exp_avg_sq"] = torch.zeros_like(master)
                state["step"] += 1
                exp_avg, exp_avg_sq, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                # The reference's arithmetic, op for op (m += (g - m)(1 - b1)), so fp32 runs match it bit for bit.
                exp_avg.add_(grad.sub(exp_avg).mul_(1 - beta1))
                exp_avg_sq.add_(grad.pow(2).sub_(exp_avg_sq).mul_(1 - beta2))
                denom = exp_avg_sq.sqrt().add_(eps)
                step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                if wd:
                    master.mul_(1 - lr * wd)
                master.add_(exp_avg.div(denom).mul_(-step_size))
                s.scatter_(master)
                master.grad = None
        self.global_step += 1
        if self.global_step % self.switch_every == 0:
            for s in self._slots():
                s.offset = (s.offset + s.count) % s.param.numel()
            self._select()
            if self.verbose >= 1:
                logger.info(
                    "BAdam ratio step %d: moved every selection on (%.3g of the entries, %s)",
                    self.global_step, self.update_ratio, self.mask_mode,
                )
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the masters and of the model's parameters."""
        for p in [s.master for s in self._slots()] + [p for _, p in self.named_parameters_list]:
            if p is None or p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    def state_dict(self) -> dict[str, Any]:
        """Adam state of the selected entries (torch's format), their fp32 masters, offsets, seeds and step."""
        out = super().state_dict()
        slots = self._slots()
        out["badam_ratio"] = {
            "names": [s.name for s in slots],
            "mask_mode": self.mask_mode,
            "counts": [s.count for s in slots],
            "seeds": [s.seed for s in slots],
            "offsets": [s.offset for s in slots],
            "global_step": self.global_step,
            "masters": [s.master for s in slots],
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a `state_dict()`: load the model's weights first, then this, and training continues exactly."""
        if "badam_ratio" not in state_dict:
            raise ValueError("this state dict was not saved by BlockOptimizerRatio (no 'badam_ratio' entry)")
        meta = state_dict["badam_ratio"]
        slots = self._slots()
        if meta["names"] != [s.name for s in slots] or meta["counts"] != [s.count for s in slots]:
            raise ValueError("the state dict was saved for other parameters or another update_ratio/preserve_threshold")
        if meta["mask_mode"] != self.mask_mode:
            raise ValueError(f"the state dict was saved with mask_mode={meta['mask_mode']!r}, not {self.mask_mode!r}")
        for s, seed, offset in zip(slots, meta["seeds"], meta["offsets"]):
            s.seed, s.offset = int(seed), int(offset)
        self.global_step = int(meta["global_step"])
        self._select()
        for s, master in zip(slots, meta["masters"]):
            assert s.master is not None
            s.master.copy_(master)
        _load_state_in_place(self, {"state": state_dict["state"], "param_groups": state_dict["param_groups"]})
