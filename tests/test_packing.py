"""Padding-free packing: packed sequences compute what they compute alone (attention within each, positions
restarting), the packed order is seeded and resumable, and a packed training step has the unpacked step's gradients."""

from __future__ import annotations

import pytest
import torch

from lit_model import GPT, Config
from lit_model.checkpointing import apply_activation_checkpointing
from lit_model.data import IGNORE_INDEX
from lit_model.data.batches import PackedBatchIterator, first_fit
from lit_model.data.sft import collate, collate_packed, inputs_targets
from lit_model.loss import head_loss

ARCHS = {
    "llama-gqa": dict(n_layer=2, n_head=4, n_query_groups=2, n_embd=32, intermediate_size=48),
    "neox-parallel": dict(n_layer=2, n_head=4, n_embd=32, intermediate_size=64, parallel_residual=True, bias=True,
                          norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", rotary_percentage=0.5,
                          hf_model_type="gpt_neox"),
    "mistral-window": dict(n_layer=2, n_head=4, n_query_groups=1, n_embd=32, intermediate_size=48, sliding_window=3,
                           hf_model_type="mistral"),
}


def tiny(arch: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(Config(vocab_size=64, block_size=64, **ARCHS[arch]))
    model.init_weights(std=0.2)
    return model


@pytest.mark.parametrize("arch", list(ARCHS))
def test_packed_sequences_compute_what_they_compute_alone(arch: str) -> None:
    model = tiny(arch).eval()
    seqs = [torch.randint(0, 64, (n,)) for n in (5, 1, 9, 4)]
    packed = model(torch.cat(seqs)[None], segments=[len(s) for s in seqs])
    alone = torch.cat([model(s[None]) for s in seqs], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    unpacked_wrongly = model(torch.cat(seqs)[None])  # without segments: one long sequence
    assert (unpacked_wrongly - alone).abs().max() > 1e-3  # so the equality above says something


def test_segments_are_checked() -> None:
    model = tiny("llama-gqa")
    with pytest.raises(ValueError, match=r"segments \[3, 3\] must be positive lengths that sum to the 7 tokens"):
        model(torch.zeros(1, 7, dtype=torch.long), segments=[3, 3])
    with pytest.raises(ValueError, match=r"single row \(got 2 rows\)"):
        model(torch.zeros(2, 6, dtype=torch.long), segments=[3, 3])


def _samples(lengths: list[int], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, 64, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 2] = IGNORE_INDEX  # a masked prompt
        out.append({"input_ids": ids, "labels": labels})
    return out


@pytest.mark.parametrize("checkpointing", [0, 1])
@pytest.mark.parametrize("drop", [False, True])
def test_packed_and_padded_steps_have_the_same_loss_and_gradients(checkpointing: int, drop: bool) -> None:
    """The loss is normalised per token over the step, packed or not: the same samples give the same gradients."""
    samples = _samples([7, 3, 12, 5, 9])
    grads = []
    for packed in (False, True):
        model = tiny("llama-gqa").train()
        if checkpointing:
            apply_activation_checkpointing(model, every=checkpointing)
        batch = collate_packed(samples) if packed else collate(samples)
        inputs, targets, segments = inputs_targets(batch)
        mask = [(True, False), (False, True)] if drop else None
        hidden = model(inputs, drop_mask=mask, return_hidden=True, segments=segments)
        loss = head_loss(model.lm_head, hidden, targets)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, ga), (loss_b, gb) = grads
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-6)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-5, rtol=1e-4, msg=name)
    padded = collate(samples)
    assert inputs_targets(collate_packed(samples))[0].numel() < padded["input_ids"][:, :-1].numel()  # no padding


def test_first_fit_fills_bins_and_keeps_every_sample() -> None:
    lengths = [5, 9, 3, 7, 2, 8, 4, 6, 1, 10]
    bins = first_fit(list(range(10)), lengths, budget=12)
    assert sorted(i for b in bins for i in b) == list(range(10))
    assert all(sum(lengths[i] for i in b) <= 12 for b in bins)
    assert len(bins) <= 6  # 55 tokens in bins of 12: at least 5
    with pytest.raises(ValueError, match=r"Sample 1 has 9 tokens, more than the packing budget of 8"):
        first_fit([0, 1], [5, 9], budget=8)


def test_packed_order_is_seeded_resumable_and_the_same_on_any_number_of_ranks() -> None:
    lengths = [(i * 7) % 13 + 2 for i in range(200)]
    one = PackedBatchIterator(lengths, budget=40, seed=3, micro_per_step=2)
    seq = [next(one) for _ in range(60)]  # crosses an epoch
    assert sorted(i for b in seq[:10] for i in b) != sorted(range(len(lengths)))[:10]  # a random order
    again = PackedBatchIterator(lengths, budget=40, seed=3, micro_per_step=2)
    for _ in range(25):
        next(again)
    resumed = PackedBatchIterator(lengths, budget=40, seed=3, micro_per_step=2)
    resumed.load_state_dict(again.state_dict())
    assert [next(resumed) for _ in range(35)] == seq[25:]
    ranks = [PackedBatchIterator(lengths, budget=40, seed=3, rank=r, world_size=2, micro_per_step=1) for r in (0, 1)]
    interleaved = [next(ranks[j % 2]) for j in range(40)]
    assert interleaved == seq[:40]  # rank r takes the r-th bin of each group: together, the 1-process order
    assert PackedBatchIterator(lengths, budget=40, seed=3).steps_per_epoch() == len(first_fit(
        torch.randperm(200, generator=torch.Generator().manual_seed(3)).tolist(), lengths, 40))


# ---- packed training runs ------------------------------------------------------------------------------------------

from tests.finetune_utils import data_args, final_weights, load_script, logged_losses, short_train  # noqa: E402
from tests.finetune_utils import tiny_checkpoint  # noqa: E402,F401 (a fixture)
from lit_model.train.args import DataArgs, DropBPArgs, EvalArgs  # noqa: E402


def packed_run(ckpt_dir, out, mode: str = "lora", **kw):
    script = load_script("finetune/full.py" if mode == "full" else "finetune/lora.py")
    data = DataArgs(**{**vars(data_args(ckpt_dir)), "packing": True, "pack_tokens": 300})
    return script.setup(checkpoint_dir=ckpt_dir, out_dir=out, data=data,
                        train=kw.pop("train", short_train(max_steps=4, save_interval=2, activation_checkpointing=1)),
                        eval=EvalArgs(interval=100, exact_match=0, max_new_tokens=2), **kw)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_packed_run_with_dropbp_and_checkpointing_learns_and_resumes_exactly(mode, tiny_checkpoint, tmp_path,
                                                                               capsys) -> None:
    dropbp = DropBPArgs(rate=0.5, warmup=0.0)
    packed_run(tiny_checkpoint, tmp_path / "straight", mode, dropbp=dropbp)
    assert "Packing: micro-batches of up to 300 tokens" in capsys.readouterr().out
    packed_run(tiny_checkpoint, tmp_path / "resumed", mode, dropbp=dropbp,
               resume=str(tmp_path / "straight" / "step-000002"))
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    la, lb = logged_losses(tmp_path / "straight"), logged_losses(tmp_path / "resumed")
    assert [la[s] for s in (3, 4)] == [lb[s] for s in (3, 4)] and la[4] < la[1]


def test_resuming_a_packed_run_without_packing_is_refused(tiny_checkpoint, tmp_path) -> None:
    packed_run(tiny_checkpoint, tmp_path / "run", train=short_train(max_steps=2, save_interval=1))
    script = load_script("finetune/lora.py")
    with pytest.raises(Exception, match="packing"):
        script.setup(checkpoint_dir=tiny_checkpoint, out_dir=tmp_path / "run2", data=data_args(tiny_checkpoint),
                     train=short_train(max_steps=4), eval=EvalArgs(interval=100, exact_match=0, max_new_tokens=2),
                     resume=str(tmp_path / "run" / "step-000001"))


def test_a_packed_qlora_run_with_accumulation_learns(tiny_checkpoint, tmp_path) -> None:
    # NF4 base, LoRA adapters, 2 micro-batches (bins) accumulated per step.
    packed_run(tiny_checkpoint, tmp_path / "q", quantize="bnb.nf4",
               train=short_train(max_steps=6, activation_checkpointing=1))
    losses = logged_losses(tmp_path / "q")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and losses[6] < losses[1]
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in final_weights(tmp_path / "q").items())
