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


# ---- multi-turn conversations on the real model and its own chat template -------------------------------------------

MULTI_TURN = [
    [{"role": "system", "content": "You are a concise geography tutor."},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."},
     {"role": "user", "content": "And of Italy? Answer like before, Paris-style."},
     {"role": "assistant", "content": "Rome. It has been the capital since 1871."}],
    [{"role": "user", "content": "Name a primary colour."},
     {"role": "assistant", "content": "Red."},
     {"role": "user", "content": "Another one?"},
     {"role": "assistant", "content": "Blue, and then yellow."},
     {"role": "user", "content": "Which is warmest?"},
     {"role": "assistant", "content": "Red is usually called the warmest."}],
]
MULTI_TURN_VAL = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And times 3?"}, {"role": "assistant", "content": "12."}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}],
]


def _expected_labels(hf_tok, conversation: list[dict]) -> list[int]:
    """Labels computed with transformers alone: -100 everywhere but each answer, which is its text's ids, then
    <|im_end|> and the newline SmolLM2's template writes after it, starting where transformers' prompt for that
    answer (the conversation before it, with the generation prompt) ends."""
    ids = hf_tok.apply_chat_template(conversation, tokenize=True)["input_ids"]
    labels = [-100] * len(ids)
    end, newline = hf_tok.convert_tokens_to_ids("<|im_end|>"), hf_tok.encode("\n", add_special_tokens=False)
    for j, message in enumerate(conversation):
        if message["role"] == "assistant":
            start = len(hf_tok.apply_chat_template(conversation[:j], tokenize=True,
                                                   add_generation_prompt=True)["input_ids"])
            answer = hf_tok.encode(message["content"], add_special_tokens=False) + [end] + newline
            assert ids[start:start + len(answer)] == answer  # the rendered conversation holds it there
            labels[start:start + len(answer)] = answer
    return labels


def _jsonl(path: Path, conversations: list[list[dict]], fmt: str) -> Path:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    records = ([{"messages": c} for c in conversations] if fmt == "messages" else
               [{"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in c]}
                for c in conversations])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_multi_turn_labels_are_exactly_the_answers(smollm2, tmp_path) -> None:
    """The "done when" of multi-turn data: a JSONL of conversations tokenized for the real model holds transformers'
    ids, and its label ids are exactly every answer's ids and the end of turn after it, nothing else."""
    from transformers import AutoTokenizer

    from lit_model.config import Config
    from lit_model.data import SFTDataset, load_conversations

    directory, _ = smollm2
    conversations = load_conversations(_jsonl(tmp_path / "chats.jsonl", MULTI_TURN, "messages"))
    assert conversations == MULTI_TURN
    config = Config.from_checkpoint(directory)
    style, source = resolve_prompt_style(None, directory, config.hf_repo or config.name)  # as training resolves it
    assert "chat template" in source
    data = SFTDataset(conversations, Tokenizer(directory), style, max_seq_length=config.block_size)
    hf_tok = AutoTokenizer.from_pretrained(directory)  # the checkpoint's tokenizer files, read by transformers
    for conversation, sample in zip(conversations, data):
        assert sample["input_ids"].tolist() == hf_tok.apply_chat_template(conversation, tokenize=True)["input_ids"]
        assert sample["labels"].tolist() == _expected_labels(hf_tok, conversation)
    assert data.num_truncated == 0 and data.num_without_targets == 0


def test_a_multi_turn_jsonl_trains_on_the_real_model(smollm2, hf, tmp_path, capsys) -> None:
    """A short LoRA run on multi-turn JSONL files (OpenAI messages to train, ShareGPT to validate) finishes, and its
    first step's loss is transformers' cross-entropy over the answer tokens alone (the adapters start at zero)."""
    from lit_model.peft.lora import LoRAConfig

    directory, _ = smollm2
    hf_model, hf_tok = hf
    train_file = _jsonl(tmp_path / "train.jsonl", MULTI_TURN, "messages")
    val_file = _jsonl(tmp_path / "val.jsonl", MULTI_TURN_VAL, "sharegpt")
    lora = load_script("finetune/lora.py")
    metrics = lora.setup(checkpoint_dir=directory, out_dir=tmp_path / "out",
                         data=DataArgs(train_file=train_file, val_file=val_file),
                         train=TrainArgs(global_batch_size=2, micro_batch_size=2, max_steps=2, learning_rate=2e-3,
                                         lr_warmup_steps=0),
                         eval=EvalArgs(interval=100, exact_match=0, max_new_tokens=4),
                         lora=LoRAConfig(r=8, alpha=16, mlp=True))
    assert "Data: 2 train / 2 validation samples; 2 steps" in capsys.readouterr().out
    losses = logged_losses(tmp_path / "out")
    assert sorted(losses) == [1, 2] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert torch.isfinite(torch.tensor(metrics["val_loss"]))
    assert (tmp_path / "out" / "final" / "lit_model.lora.pth").is_file()
    # Step 1 holds both training conversations: its loss is the mean over their answer tokens (all tokens of the
    # step normalise it), computed here with transformers' model and the labels of transformers' tokenizer.
    answer_sum, answer_count, all_sum, all_count = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for conversation in MULTI_TURN:
            ids = torch.tensor(hf_tok.apply_chat_template(conversation, tokenize=True)["input_ids"])
            labels = torch.tensor(_expected_labels(hf_tok, conversation))
            logits = hf_model(ids[None]).logits[0, :-1].float()
            answer_sum += float(torch.nn.functional.cross_entropy(logits, labels[1:], reduction="sum"))
            answer_count += int((labels[1:] != -100).sum())
            all_sum += float(torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum"))
            all_count += ids.numel() - 1
    expected = answer_sum / answer_count
    assert abs(all_sum / all_count - expected) > 0.1  # the check tells the two apart
    assert losses[1] == pytest.approx(expected, rel=1e-3), (losses[1], expected, all_sum / all_count)
