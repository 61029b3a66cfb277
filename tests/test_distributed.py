"""Several processes on CPU (gloo), launched by Fabric from the real scripts: DDP and FSDP equal one process.

Each multi-process run is `python finetune/{full,lora}.py --devices 2 --strategy ...` in a subprocess (Fabric starts
the second rank by re-running the command); the reference is the same script on one device. Equal means the same
losses in metrics.csv and the same saved weights, up to float32 rounding.

Run `python tests/test_distributed.py` to measure how DDP handles DropBP's parameters without gradients
(docs/distributed.md quotes its numbers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import yaml

from lit_model.train import checkpoints as ckpt
from lit_model.train.args import BAdamArgs, DataArgs, DropBPArgs, EvalArgs, TrainArgs
from lit_model.data import BatchIterator
from lit_model.peft.lora import LoRAConfig
from tests.finetune_utils import (  # noqa: F401 (tiny_checkpoint is a fixture)
    ROOT, data_args, final_weights, load_script, logged_losses, tiny_checkpoint,
)

# One optimizer step = 8 samples: 2 ranks x micro-batch 2 x 2 accumulated, or 1 process x micro-batch 4 x 2.
TRAIN = dict(global_batch_size=8, micro_batch_size=2, max_steps=4, learning_rate=1e-2, lr_warmup_steps=1)
EVAL = dict(interval=100, exact_match=0, max_new_tokens=2)
LORA = dict(r=4, alpha=8, dropout=0.0, mlp=True)  # no dropout: its masks depend on the batch shape


def flags(group: str, values: dict[str, Any]) -> list[str]:
    out = []
    for key, value in values.items():
        out += [f"--{group}.{key}", "null" if value is None else str(value).lower() if isinstance(value, bool) else
                str(value)]
    return out


def launch(ckpt_dir: Path, out: Path, mode: str = "full", devices: int = 2, strategy: str = "ddp",
           driver: Optional[Path] = None, env: Optional[dict[str, str]] = None, timeout: int = 300,
           check: bool = True, **groups: Any) -> subprocess.CompletedProcess:
    """Run a finetune script (or a driver that patches it, then runs it) as its own command on `devices` processes."""
    script = driver or ROOT / "finetune" / ("full.py" if mode == "full" else "lora.py")
    cmd = [sys.executable, str(script), "--checkpoint_dir", str(ckpt_dir), "--out_dir", str(out),
           "--devices", str(devices), "--strategy", strategy,
           "--data.train_file", str(ckpt_dir.parent / "train.json"),
           "--data.val_file", str(ckpt_dir.parent / "val.json"),
           "--data.prompt_style", "alpaca"]
    cmd += flags("train", {**TRAIN, **groups.pop("train", {})}) + flags("eval", {**EVAL, **groups.pop("eval", {})})
    if mode != "full":
        cmd += flags("lora", {**LORA, **groups.pop("lora", {})})
    for name, value in groups.items():
        cmd += flags(name, value) if isinstance(value, dict) else [f"--{name}", str(value)]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", **(env or {})}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=run_env)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def run_here(ckpt_dir: Path, out: Path, mode: str = "full", **groups: Any) -> dict[str, float]:
    """The same run on one device, in this process."""
    script = load_script("finetune/full.py" if mode == "full" else "finetune/lora.py")
    kwargs: dict[str, Any] = dict(
        checkpoint_dir=ckpt_dir, out_dir=out, data=DataArgs(**{**vars(data_args(ckpt_dir)), **groups.pop("data", {})}),
        train=TrainArgs(**{**TRAIN, **groups.pop("train", {})}), eval=EvalArgs(**{**EVAL, **groups.pop("eval", {})}))
    if mode != "full":
        kwargs["lora"] = LoRAConfig(**{**LORA, **groups.pop("lora", {})})
    if "dropbp" in groups:
        kwargs["dropbp"] = DropBPArgs(**groups.pop("dropbp"))
    if "badam" in groups:
        kwargs["badam"] = BAdamArgs(**groups.pop("badam"))
    return script.setup(**kwargs, **groups)


def assert_same_run(a: Path, b: Path, atol: float = 1e-5) -> None:
    la, lb = logged_losses(a), logged_losses(b)
    assert la.keys() == lb.keys() and la
    for step in la:
        assert la[step] == pytest.approx(lb[step], abs=atol), (step, la, lb)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=1e-4, msg=key)


def moved(base: Path, out: Path) -> bool:
    """Whether training changed the weights at all (so that equality between runs means something)."""
    tuned = final_weights(out)
    if any("lora_" in k for k in tuned):
        return any(v.abs().sum() > 0 for k, v in tuned.items() if "lora_B" in k)
    ref = torch.load(base / "lit_model.pth", weights_only=True)
    return any(not torch.equal(ref[k], tuned[k]) for k in ref)


# ---- data order and arguments (in-process, fast) ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [10, 12, 13])
def test_ranks_together_see_what_one_process_sees(n) -> None:
    # Global batch 4: one process takes micro-batches of 2 twice per step, two ranks one each; ragged epoch tails are
    # dropped per optimizer step, so epochs end at the same sample on any number of devices.
    one = BatchIterator(n, 2, seed=3, step_samples=4)
    ranks = [BatchIterator(n, 2, seed=3, rank=r, world_size=2, step_samples=4) for r in range(2)]
    single = [next(one) for _ in range(12)]
    together = [batch for _ in range(6) for batch in (next(ranks[0]), next(ranks[1]))]
    assert single == together
    assert one.state_dict() == ranks[0].state_dict() == ranks[1].state_dict()
    per_epoch = (n // 4) * 2  # micro-batches per epoch
    assert sorted(i for b in single[:per_epoch] for i in b) == sorted(set(i for b in single[:per_epoch] for i in b))


def test_batch_iterator_errors() -> None:
    with pytest.raises(ValueError, match="cannot fill one micro-batch of 4 on 2 devices"):
        BatchIterator(7, 4, seed=0, world_size=2)
    with pytest.raises(ValueError, match="optimizer steps of 16: the step must be a multiple .* lower the global"):
        BatchIterator(10, 2, seed=0, world_size=2, step_samples=16)


def test_distributed_argument_errors(tiny_checkpoint, tmp_path) -> None:
    full, lora = load_script("finetune/full.py"), load_script("finetune/lora.py")
    common = dict(checkpoint_dir=tiny_checkpoint, out_dir=tmp_path, data=data_args(tiny_checkpoint))
    with pytest.raises(ValueError, match=r"(?s)global_batch_size \(8\) must be a multiple .* \(12\).*--strategy must "
                                         r"be one of auto, ddp, fsdp, got 'zero3'"):
        full.setup(**common, devices=3, num_nodes=4, strategy="zero3", train=TrainArgs(global_batch_size=8,
                                                                                       micro_batch_size=1))
    with pytest.raises(ValueError, match="--devices and --num_nodes must be positive"):
        full.setup(**common, devices=0)
    with pytest.raises(ValueError, match=r"(?s)--strategy fsdp cannot shard 4-bit weights.*Use --strategy ddp for "
                                         r"QLoRA.*--dropbp.rate > 0 runs with --strategy ddp"):
        lora.setup(**common, devices=2, strategy="fsdp", quantize="bnb.nf4", dropbp=DropBPArgs(rate=0.5))
    with pytest.raises(ValueError, match="--optimizer badam runs with --strategy ddp"):
        full.setup(**common, devices=2, strategy="fsdp", optimizer="badam")


def test_diverging_ranks_are_reported(monkeypatch) -> None:
    import lit_model.train.dist as training

    class TwoRanks:
        world_size = 2

    monkeypatch.setattr(training, "gather_objects", lambda fabric, value: [value, {"steps": 3}])
    training.check_same_on_all_ranks(TwoRanks(), {"steps": 3}, "DropBP masks")  # equal: nothing to say
    with pytest.raises(RuntimeError, match=r"DropBP masks differ between rank 0 and rank\(s\) \[1\].*same code, seed"):
        training.check_same_on_all_ranks(TwoRanks(), {"steps": 4}, "DropBP masks")


# ---- DDP: 2 processes equal 1 process --------------------------------------------------------------------------------


def test_ddp_full_fine_tuning_equals_one_process(tiny_checkpoint, tmp_path) -> None:
    # The default suite's real 2-process run (~10 s): gradient clipping, checkpoints, token normalisation over ranks.
    result = launch(tiny_checkpoint, tmp_path / "ddp", train={"max_norm": 1.0, "save_interval": 2})
    assert "2 per micro-batch x 2 accumulated x 2 ranks" in result.stdout
    run_here(tiny_checkpoint, tmp_path / "one", train={"micro_batch_size": 4, "max_norm": 1.0})
    assert moved(tiny_checkpoint, tmp_path / "ddp")
    assert_same_run(tmp_path / "one", tmp_path / "ddp")
    state = ckpt.load_training_state(tmp_path / "ddp" / "step-000002")
    assert state["world_size"] == 2 and len(state["rng_per_rank"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_ddp_packed_equals_one_process_packed(mode, tiny_checkpoint, tmp_path) -> None:
    # Rank r takes the r-th bin of each group; one process takes the same bins in turn, and the loss is normalised over
    # the step's tokens on all ranks: the same steps. (Not with DropBP: its masks are drawn per global micro-batch, and
    # one process takes twice as many micro-batches per step here.)
    data = {"packing": True, "pack_tokens": 300}
    launch(tiny_checkpoint, tmp_path / "ddp", mode=mode, data=data)
    run_here(tiny_checkpoint, tmp_path / "one", mode=mode, data=data)
    assert moved(tiny_checkpoint, tmp_path / "ddp")
    assert_same_run(tmp_path / "one", tmp_path / "ddp")


@pytest.mark.slow
def test_torchrun_launch_equals_fabric_launch(tiny_checkpoint, tmp_path) -> None:
    # Under torchrun (and SLURM, and `fabric run`) the processes exist already and Fabric only joins them.
    data = {"train_file": str(tiny_checkpoint.parent / "train.json"),
            "val_file": str(tiny_checkpoint.parent / "val.json"), "prompt_style": "alpaca"}
    config = {"checkpoint_dir": str(tiny_checkpoint), "out_dir": str(tmp_path / "torchrun"), "devices": 2,
              "strategy": "ddp", "data": data, "train": TRAIN, "eval": EVAL}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "finetune/full.py",
           "--config", str(tmp_path / "config.yaml")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-4000:]
    run_here(tiny_checkpoint, tmp_path / "one", train={"micro_batch_size": 4})
    assert_same_run(tmp_path / "one", tmp_path / "torchrun")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_ddp_lora_and_qlora_equal_one_process(mode, tiny_checkpoint, tmp_path) -> None:
    extra = {"quantize": "bnb.nf4"} if mode == "qlora" else {}
    launch(tiny_checkpoint, tmp_path / "ddp", mode="lora", train={"activation_checkpointing": 1}, **extra)
    run_here(tiny_checkpoint, tmp_path / "one", mode="lora", train={"micro_batch_size": 4}, **extra)
    assert moved(tiny_checkpoint, tmp_path / "ddp")
    assert_same_run(tmp_path / "one", tmp_path / "ddp")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_ddp_dropbp_equals_one_process_with_the_global_micro_batch(mode, tiny_checkpoint, tmp_path) -> None:
    # One mask per global micro-batch (the 2 ranks' micro-batches of 2 together), the same on both ranks: one process
    # with micro-batches of 4 draws the same masks. Rate 0.5 on 4 branches drops some parameters in every
    # micro-batch of a step (their gradient must stay None, not zero) and some in the last one only.
    dropbp = {"rate": 0.5, "sensitivity_at": 0.0}
    result = launch(tiny_checkpoint, tmp_path / "ddp", mode=mode, dropbp=dropbp,
                    train={"max_norm": 1.0, "activation_checkpointing": 1, "max_steps": 6})
    assert "DropBP: the same 12 masks and rates on all 2 ranks" in result.stdout
    run_here(tiny_checkpoint, tmp_path / "one", mode=mode, dropbp=dropbp,
             train={"micro_batch_size": 4, "max_norm": 1.0, "activation_checkpointing": 1, "max_steps": 6})
    assert moved(tiny_checkpoint, tmp_path / "ddp")
    assert_same_run(tmp_path / "one", tmp_path / "ddp")


@pytest.mark.slow
def test_ddp_lora_with_fully_dropped_micro_batches(tiny_checkpoint, tmp_path) -> None:
    # Rate 0.9 with LoRA inside the blocks only: some micro-batches, including last ones, reach no trainable tensor.
    driver, logs = mask_recorder(tmp_path, "lora")
    dropbp = {"rate": 0.9, "sensitivity_at": 0.0}
    launch(tiny_checkpoint, tmp_path / "ddp", mode="lora", driver=driver, env={"MASK_LOG": str(logs)}, dropbp=dropbp,
           train={"max_steps": 8})
    masks = [json.loads(line)["mask"] for line in (logs / "rank0.jsonl").read_text().splitlines()]
    last_ones = masks[1::2]  # 2 micro-batches per step on each rank: the second one synchronises
    assert any(all(a and m for a, m in mask) for mask in last_ones)
    run_here(tiny_checkpoint, tmp_path / "one", mode="lora", dropbp=dropbp,
             train={"micro_batch_size": 4, "max_steps": 8})
    assert moved(tiny_checkpoint, tmp_path / "ddp")
    assert_same_run(tmp_path / "one", tmp_path / "ddp")


RECORD_MASKS = '''
import json, os, sys
import torch.distributed as dist
from lit_model.dropbp import DropBPHandler

draw = DropBPHandler.set_dropped_layers

def recorded(self):
    mask = draw(self)
    rank = dist.get_rank() if dist.is_initialized() else 0
    with open(os.path.join(os.environ["MASK_LOG"], f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps({"mask": mask, "rates": self.drop_rates}) + "\\n")
    return mask

DropBPHandler.set_dropped_layers = recorded
# Not runpy: it would set sys.argv[0] to the script, and Fabric starts the other ranks by re-running sys.argv.
sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"], "finetune"))
from lit_model.cli import script_main
script_main(__import__(os.environ["SCRIPT"]).setup)
'''


def mask_recorder(tmp_path: Path, script: str = "full") -> tuple[Path, Path]:
    """A driver that runs finetune/`script` and logs every DropBP mask drawn, one JSONL file per rank."""
    driver, logs = tmp_path / f"record_{script}.py", tmp_path / "masks"
    driver.write_text(RECORD_MASKS.replace('os.environ["SCRIPT"]', repr(script)))
    logs.mkdir()
    return driver, logs


@pytest.mark.slow
def test_ddp_masks_and_calibrated_rates_are_identical_on_every_rank(tiny_checkpoint, tmp_path) -> None:
    driver, logs = mask_recorder(tmp_path)
    # Calibration before the first step (0.1 x 4 steps rounds down to 0), so that both runs measure the base model,
    # on the next 2 micro-batches of 2 samples: one per rank, their sensitivities summed over the ranks.
    dropbp = {"rate": 0.5, "method": "paper", "sensitivity_at": 0.1, "sensitivity_samples": 2}
    launch(tiny_checkpoint, tmp_path / "ddp", driver=driver, env={"MASK_LOG": str(logs)}, dropbp=dropbp)
    ranks = [[json.loads(line) for line in (logs / f"rank{r}.jsonl").read_text().splitlines()] for r in range(2)]
    assert len(ranks[0]) == 8 and ranks[0] == ranks[1]  # 4 steps x 2 micro-batches, the same draws on both ranks
    assert {tuple(map(tuple, r["mask"])) for r in ranks[0]} != {((False, False), (False, False))}
    assert ranks[0][0]["rates"] == ranks[0][-1]["rates"] != [0.5] * 4  # calibrated before the first mask
    # The calibration samples do not depend on the number of ranks: one process measures the same two micro-batches.
    run_here(tiny_checkpoint, tmp_path / "one", dropbp=dropbp)
    one = yaml.safe_load((tmp_path / "one" / "final" / "dropbp.yaml").read_text())
    ddp = yaml.safe_load((tmp_path / "ddp" / "final" / "dropbp.yaml").read_text())
    assert [one[f"dropbp/rate/{b}"] for b in ("attn_0", "mlp_0", "attn_1", "mlp_1")] == ranks[0][-1]["rates"]
    for key in one:
        if key.startswith("dropbp/sensitivity/"):
            assert ddp[key] == pytest.approx(one[key], rel=1e-4), key


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["badam", "badam_ratio"])
def test_badam_on_two_processes_equals_one(optimizer, tiny_checkpoint, tmp_path) -> None:
    # Block switches every 2 steps in random order, with DropBP: the loop all-reduces only the optimizer's gradients.
    groups = dict(optimizer=optimizer, badam={"switch_block_every": 2, "switch_mode": "random"},
                  dropbp={"rate": 0.5, "sensitivity_at": 0.0})
    launch(tiny_checkpoint, tmp_path / "ddp", train={"max_norm": 1.0, "max_steps": 6}, **groups)
    run_here(tiny_checkpoint, tmp_path / "one", train={"micro_batch_size": 4, "max_norm": 1.0, "max_steps": 6},
             **groups)
    assert moved(tiny_checkpoint, tmp_path / "ddp")
    # Adam divides tiny gradients by their own tiny norms: rounding differences grow a little more than with AdamW.
    assert_same_run(tmp_path / "one", tmp_path / "ddp", atol=5e-5)


# ---- FSDP ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fsdp_equals_one_process_saves_full_checkpoints_and_resumes(mode, tiny_checkpoint, tmp_path) -> None:
    # Each Block one FSDP unit, with our activation checkpointing inside the units; exact match and the sample
    # generation run through the sharded model.
    train = {"max_norm": 1.0, "activation_checkpointing": 1, "save_interval": 2}
    launch(tiny_checkpoint, tmp_path / "fsdp", mode=mode, strategy="fsdp", train=train,
           eval={"interval": 2, "exact_match": 2})
    run_here(tiny_checkpoint, tmp_path / "one", mode=mode, train={**train, "micro_batch_size": 4})
    assert moved(tiny_checkpoint, tmp_path / "fsdp")
    assert_same_run(tmp_path / "one", tmp_path / "fsdp")
    # The checkpoint is the 1-device format: plain state dict, optimizer state keyed like torch's.
    one_state = ckpt.load_training_state(tmp_path / "one" / "step-000002")["optimizer"]
    fsdp_state = ckpt.load_training_state(tmp_path / "fsdp" / "step-000002")["optimizer"]
    assert fsdp_state["param_groups"][0]["params"] == one_state["param_groups"][0]["params"]
    for i, values in one_state["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fsdp_state["state"][i][name], values[name], atol=1e-5, rtol=1e-4)
    # Resume under FSDP continues exactly; a generate script reads the checkpoint directory as it is.
    launch(tiny_checkpoint, tmp_path / "resumed", mode=mode, strategy="fsdp", train=train,
           resume=str(tmp_path / "fsdp" / "step-000002"))
    straight, resumed = logged_losses(tmp_path / "fsdp"), logged_losses(tmp_path / "resumed")
    assert resumed == {3: straight[3], 4: straight[4]}
    wa, wb = final_weights(tmp_path / "fsdp"), final_weights(tmp_path / "resumed")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=0, rtol=0)
    # The same checkpoint resumes on one device and ends where the 1-device run does.
    run_here(tiny_checkpoint, tmp_path / "one_resumed", mode=mode, train={**train, "micro_batch_size": 4},
             resume=str(tmp_path / "fsdp" / "step-000002"))
    wa, wb = final_weights(tmp_path / "one"), final_weights(tmp_path / "one_resumed")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-4)
    generate = load_script("generate/base.py")
    assert len(generate.main(prompt="Reverse the word cat.", checkpoint_dir=tmp_path / "fsdp" / "final",
                             max_new_tokens=2, temperature=0)) == 1


# ---- crash and resume ------------------------------------------------------------------------------------------------


CRASH = '''
import os, sys
import torch.distributed as dist
import lit_model.train.checkpoints as resume

write = resume.write_checkpoint

def write_then_die(target, contents):
    # Rank 0 is the only writer: it dies like a killed process once the files are written, before the rename.
    if target.name == os.environ["CRASH_AT"]:
        return write(target, lambda tmp: (contents(tmp), os._exit(7)))
    return write(target, contents)

resume.write_checkpoint = write_then_die
sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"], "finetune"))
from full import setup
from lit_model.cli import script_main
script_main(setup)
'''


@pytest.mark.slow
def test_a_rank_dying_mid_save_keeps_the_last_checkpoint_and_resume_continues(tiny_checkpoint, tmp_path) -> None:
    driver = tmp_path / "crash.py"
    driver.write_text(CRASH)
    out = tmp_path / "ddp"
    train = {"save_interval": 2, "max_steps": 6}
    cut = launch(tiny_checkpoint, out, driver=driver, env={"CRASH_AT": "step-000004"}, train=train, check=False,
                 timeout=240)
    assert cut.returncode != 0
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000002"]  # the half-written step 4 is not listed
    assert not (out / "step-000004").exists() and not (out / "final").exists()
    # The surviving checkpoint is complete: it loads and generates.
    generate = load_script("generate/base.py")
    assert len(generate.main(prompt="Reverse the word cat.", checkpoint_dir=out / "step-000002", max_new_tokens=2,
                             temperature=0)) == 1
    resumed = launch(tiny_checkpoint, out, train=train, resume="auto")
    assert "Resumed from" in resumed.stdout and "step-000002 at step 2 of 6" in resumed.stdout
    run_here(tiny_checkpoint, tmp_path / "one", train={**train, "micro_batch_size": 4})
    one, ddp = logged_losses(tmp_path / "one"), logged_losses(out)  # one metrics.csv, continued after the crash
    assert sorted(ddp) == [1, 2, 3, 4, 5, 6] and all(ddp[k] == pytest.approx(one[k], abs=1e-5) for k in ddp)
    wa, wb = final_weights(tmp_path / "one"), final_weights(out)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-4)


# ---- DDP and DropBP's parameters without gradients: the measurement in docs/distributed.md ---------------------------


def _bench(n_layer: int, n_embd: int, steps: int, seq_len: int, out_file: str) -> None:
    """Time one optimizer step (2 micro-batches of 4 x seq_len tokens per rank, DropBP 0.5) three ways on 2 ranks.

    - zero_fill: what the loop does. find_unused_parameters=False; in the synchronising micro-batch every dropped
      parameter gets a zero gradient through a 0-valued loss term, and after the sync the gradients of parameters
      dropped in every micro-batch are set back to None (so AdamW skips them, as on one device).
    - find_unused: DDP(find_unused_parameters=True). It needs the LM head inside DDP's forward (the loop's chunked
      loss applies it outside, which find_unused_parameters rejects), so the loss is computed in the forward here.
    - no_dropbp: the same model without DropBP, for scale.
    Also asserts that zero_fill and find_unused train to the same weights.
    """
    from lightning.fabric import Fabric
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lit_model import GPT, Config
    from lit_model.dropbp import DropBPHandler
    from lit_model.loss import chunked_cross_entropy, lm_head_weight
    from lit_model.train.dist import LossInForward, zero_gradient_term
    from lit_model.dropbp import dropped_parameters

    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    torch.set_num_threads(1)
    config = Config(name="bench", n_layer=n_layer, n_head=4, n_embd=n_embd, n_query_groups=4,
                    intermediate_size=4 * n_embd, vocab_size=512, block_size=seq_len + 1)
    rank_data = torch.Generator().manual_seed(fabric.global_rank)
    data = torch.randint(0, 512, (steps + 2, 2, 4, seq_len + 1), generator=rank_data)
    results: dict[str, Any] = {}
    for variant in ("no_dropbp", "zero_fill", "find_unused"):
        torch.manual_seed(0)
        gpt = GPT(config)
        gpt.init_weights()
        handler = DropBPHandler(gpt, drop_rate=0.0 if variant == "no_dropbp" else 0.5, seed=1)
        wrapped = LossInForward(gpt) if variant == "find_unused" else gpt
        ddp = DDP(wrapped, find_unused_parameters=variant == "find_unused")
        opt = torch.optim.AdamW(gpt.parameters(), lr=1e-3)
        times = []
        for step in range(steps + 2):
            t0 = time.perf_counter()
            never: Optional[dict[int, torch.Tensor]] = None
            for i in range(2):
                x, y = data[step, i, :, :-1], data[step, i, :, 1:]
                mask = handler.set_dropped_layers()
                sync = i == 1
                with (ddp.no_sync() if not sync else torch.enable_grad()):
                    if variant == "find_unused":
                        loss = ddp(x, drop_mask=mask, target=y)
                    else:
                        hidden = ddp(x, drop_mask=mask, return_hidden=True)
                        weight, bias = lm_head_weight(gpt.lm_head)
                        loss = chunked_cross_entropy(hidden, weight, y, bias)
                        if variant == "zero_fill":
                            dropped = {id(p): p for p in dropped_parameters(gpt, mask)}
                            never = {k: p for k, p in dropped.items() if never is None or k in never}
                            if sync and dropped:
                                loss = loss + zero_gradient_term(list(dropped.values()))
                    if loss.grad_fn is not None:
                        loss.backward()
            for p in (never or {}).values():
                p.grad = None
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= 2:  # warm-up: DDP rebuilds its buckets after the first iteration
                times.append(time.perf_counter() - t0)
        times.sort()
        results[variant] = {"median_ms": 1000 * times[len(times) // 2], "weights": [p.detach().clone() for p in
                                                                                     gpt.parameters()]}
    diff = max(float((a - b).abs().max()) for a, b in zip(results["zero_fill"]["weights"],
                                                          results["find_unused"]["weights"]))
    if fabric.global_rank == 0:
        summary = {k: round(v["median_ms"], 2) for k, v in results.items()}
        params = sum(p.numel() for p in gpt.parameters())
        Path(out_file).write_text(json.dumps({"params": params, "median_ms": summary, "max_weight_diff": diff}))
        print(json.dumps({"params": params, "median_ms": summary, "max_weight_diff": diff}))


@pytest.mark.slow
def test_zero_fill_and_find_unused_parameters_train_the_same(tmp_path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(Path(__file__)), "--layers", "2", "--embd", "32", "--steps", "3", "--seq", "16",
           "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(out.read_text())
    assert found["max_weight_diff"] < 1e-5 and set(found["median_ms"]) == {"no_dropbp", "zero_fill", "find_unused"}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Time DDP's handling of DropBP's parameters without gradients")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--embd", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", default="ddp_unused_bench.json")
    a = parser.parse_args()
    _bench(a.layers, a.embd, a.steps, a.seq, a.out)
