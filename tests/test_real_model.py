"""The real SmolLM2-135M-Instruct (30 layers, its own chat template), end to end: greedy chat generation equals
transformers' `apply_chat_template` + `generate`, a short LoRA run lowers the validation loss, QLoRA and DropBP run.

Needs `python scripts/fetch_smollm2.py` (the `smollm2` fixture skips without it, or fails under
LIT_REQUIRE_REAL_MODEL=1). The weights and logits themselves are checked in tests/test_gguf.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lit_model.train.args import DataArgs, DropBPArgs, EvalArgs, TrainArgs
from lit_model.checkpoint_io import load_model
from lit_model.prompts import resolve_prompt_style
from lit_model.sampling import generate
from lit_model.tokenizer import Tokenizer
from tests.finetune_utils import load_script, logged_losses

pytestmark = pytest.mark.real_model

QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow."]


@pytest.fixture(autouse=True)
def _both_cores(_one_thread):
    """A 135M model is big enough for the second core to pay (the suite's one-thread rule is for toy models)."""
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def hf(smollm2):
    """transformers' model and tokenizer, loaded from the GGUF file by transformers itself: the oracle."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, gguf_file = smollm2
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


def test_greedy_chat_generation_equals_transformers(smollm2, hf, capsys) -> None:
    directory, _ = smollm2
    hf_model, hf_tok = hf
    ours, tok = load_model(directory), Tokenizer(directory)
    style, source = resolve_prompt_style(None, directory, ours.config.hf_repo, for_generation=True)
    assert "chat template" in source
    for question in QUESTIONS:
        prompt = tok.encode(style.apply(question), bos=style.adds_bos, special=style.special_in_text)
        expected_prompt = hf_tok.apply_chat_template([{"role": "user", "content": question}], tokenize=True,
                                                     add_generation_prompt=True)["input_ids"]
        assert prompt.tolist() == list(expected_prompt)
        ids = generate(ours, prompt, 24, temperature=0.0, stop_tokens=style.stop_tokens(tok))
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([expected_prompt]), max_new_tokens=24, do_sample=False)
        expected = out[0, len(expected_prompt):].tolist()
        stop = tok.token_to_id("<|im_end|>")
        if stop in expected:  # transformers includes the EOS it stopped on; ours does not yield stop tokens
            expected = expected[: expected.index(stop)]
        assert ids == expected, question
    # The CLI answers the same.
    script = load_script("generate/base.py")
    text = script.main(prompt=QUESTIONS[0], checkpoint_dir=directory, temperature=0.0, max_new_tokens=24,
                       device="cpu")[0]
    assert "Paris" in text
    assert "Prompts: the chat template of" in capsys.readouterr().err


def _demo_files(root: Path, n_train: int, n_val: int) -> DataArgs:
    from lit_model.data.demo_tasks import write_demo_dataset

    train, val = write_demo_dataset(root)
    records = json.loads(train.read_text())[:n_train]
    train.write_text(json.dumps(records))
    val.write_text(json.dumps(json.loads(val.read_text())[:n_val]))
    return DataArgs(train_file=train, val_file=val)


def test_short_lora_run_lowers_the_validation_loss(smollm2, tmp_path, capsys) -> None:
    directory, _ = smollm2
    lora = load_script("finetune/lora.py")
    from lit_model.peft.lora import LoRAConfig

    metrics = lora.setup(checkpoint_dir=directory, out_dir=tmp_path / "out", data=_demo_files(tmp_path, 160, 16),
                         train=TrainArgs(global_batch_size=4, micro_batch_size=4, max_steps=20, learning_rate=2e-3,
                                         lr_warmup_steps=2),
                         eval=EvalArgs(interval=100, exact_match=0, max_new_tokens=8),
                         lora=LoRAConfig(r=8, alpha=16, mlp=True))
    assert metrics["val_loss"] < 0.7 * metrics["val_loss_before"], metrics
    out = capsys.readouterr().out
    assert "Prompts: the chat template of" in out and "parameters float32" in out
    saved = (tmp_path / "out" / "final" / "prompt_style.yaml").read_text()
    assert "chat_template" in saved


@pytest.mark.parametrize("variant", ["qlora", "dropbp"])
def test_qlora_and_dropbp_run(smollm2, tmp_path, variant) -> None:
    directory, _ = smollm2
    lora = load_script("finetune/lora.py")
    from lit_model.peft.lora import LoRAConfig

    kwargs = dict(quantize="bnb.nf4", precision="bf16-true") if variant == "qlora" else dict(
        dropbp=DropBPArgs(rate=0.5, sensitivity_at=0.0))
    metrics = lora.setup(checkpoint_dir=directory, out_dir=tmp_path / "out", data=_demo_files(tmp_path, 32, 8),
                         train=TrainArgs(global_batch_size=4, micro_batch_size=4, max_steps=3, learning_rate=2e-3,
                                         lr_warmup_steps=0),
                         eval=EvalArgs(interval=100, exact_match=0, max_new_tokens=4),
                         lora=LoRAConfig(r=8, alpha=16, mlp=True), **kwargs)
    losses = logged_losses(tmp_path / "out")
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert metrics["val_loss"] < metrics["val_loss_before"] + 0.5
    assert (tmp_path / "out" / "final" / "lit_model.lora.pth").is_file()
