"""BAdam through finetune/full.py: trains block by block, composes with DropBP and checkpointing, resumes exactly."""

from __future__ import annotations

import pytest
import torch

from lit_model.train.args import BAdamArgs, DropBPArgs, EvalArgs
from tests.finetune_utils import data_args, load_script, short_train, tiny_checkpoint  # noqa: F401 (fixture)


def run(ckpt_dir, out, **kw):
    full = load_script("finetune/full.py")
    train = kw.pop("train", short_train(max_steps=4))
    return full.setup(checkpoint_dir=ckpt_dir, out_dir=out, data=data_args(ckpt_dir), train=train,
                      eval=EvalArgs(interval=100, exact_match=0, max_new_tokens=2), **kw)


@pytest.mark.parametrize("optimizer", ["badam", "badam_ratio"])
def test_badam_changes_only_the_visited_blocks(optimizer, tiny_checkpoint, tmp_path) -> None:
    # 2 blocks, a switch every 2 steps in ascending order: 2 steps only ever reach block 0.
    run(tiny_checkpoint, tmp_path, optimizer=optimizer, train=short_train(max_steps=2),
        badam=BAdamArgs(switch_block_every=2, switch_mode="ascending"))
    base = torch.load(tiny_checkpoint / "lit_model.pth", weights_only=True)
    tuned = torch.load(tmp_path / "final" / "lit_model.pth", weights_only=True)
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    if optimizer == "badam":
        assert changed and all(k.startswith("transformer.h.0.") for k in changed)
    else:  # every matrix trains a share of its entries; embedding and head stay frozen
        assert any(k.startswith("transformer.h.1.") for k in changed)
        assert "transformer.wte.weight" not in changed and "lm_head.weight" not in changed


def test_badam_with_dropbp_checkpointing_accumulation_and_resume(tiny_checkpoint, tmp_path) -> None:
    kw = dict(optimizer="badam", badam=BAdamArgs(switch_block_every=2, switch_mode="random"),
              dropbp=DropBPArgs(rate=0.5, sensitivity_at=0.0),
              train=short_train(max_steps=6, save_interval=3, activation_checkpointing=1))
    run(tiny_checkpoint, tmp_path / "a", **kw)
    run(tiny_checkpoint, tmp_path / "b", resume=str(tmp_path / "a" / "step-000003"), **kw)
    a = torch.load(tmp_path / "a" / "final" / "lit_model.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "final" / "lit_model.pth", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


def test_badam_is_for_full_fine_tuning_with_ddp(tiny_checkpoint, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"(?s)--optimizer badam runs with --strategy ddp.*--badam.switch_mode must be random"):
        run(tiny_checkpoint, tmp_path, optimizer="badam", devices=2, strategy="fsdp",
            badam=BAdamArgs(switch_mode="sideways"), train=short_train(global_batch_size=8))
