"""Make the bundled demo base model in `checkpoints/demo`: a byte-level BPE tokenizer and a tiny Llama-style GPT
pretrained on the raw-text digit puzzles of `lit_model.data.demo_tasks` (never on instruction prompts).

Reproduce the committed checkpoint (5 to 10 minutes on 2 shared CPU cores):

    python scripts/prepare_demo.py

The run is seeded (data order, initialisation) and single-process; bit-identical weights need the same torch
version and CPU kernels, which the README written next to the weights records.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lit_model import GPT, Config
from lit_model.data.demo_tasks import (
    DEMO_N_PRETRAIN,
    DEMO_N_VAL,
    DEMO_SEED,
    make_demo_records,
    pretraining_corpus,
    raw_facts,
    tokenizer_training_text,
)
from lit_model.prompts import PromptStyle

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def build_tokenizer(vocab_size: int = 512) -> "tokenizers.Tokenizer":  # noqa: F821 (imported inside)
    """A byte-level BPE tokenizer whose merges come from the demo's templates; digits always stay single tokens.

    BPE training here is deterministic (a fixed text, ties broken by the library's fixed order), so no seed is needed.
    The vocabulary ends below `vocab_size` once every word of the templates is a single token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # Digits first: an operand then tokenizes identically in a fact, an instruction and an answer.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_training_text(), trainer)
    return tokenizer


def demo_config(vocab_size: int) -> Config:
    """The demo model: 4 Llama blocks (RMSNorm, SwiGLU, RoPE), grouped-query attention with 2 key/value heads."""
    return Config(
        name="demo",
        hf_model_type="llama",
        block_size=256,
        vocab_size=vocab_size,
        n_layer=4,
        n_head=4,
        n_embd=128,
        n_query_groups=2,
        intermediate_size=384,
        norm_eps=1e-5,
    )


def pack_documents(documents: list[list[int]], block_size: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedily pack whole documents into rows of `block_size + 1` tokens; returns (inputs, targets), each (N, T).

    A document never straddles two rows, so every row starts with a document's BOS as prompts do; the tail of a row
    is padding, which the targets mark -100 (ignored by the loss).
    """
    rows: list[list[int]] = []
    row: list[int] = []
    for doc in documents:
        if len(doc) > block_size + 1:
            raise ValueError(f"A pretraining document of {len(doc)} tokens exceeds block_size + 1 = {block_size + 1}")
        if len(row) + len(doc) > block_size + 1:
            rows.append(row)
            row = []
        row = row + doc
    if row:
        rows.append(row)
    data = torch.full((len(rows), block_size + 1), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), block_size + 1), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        data[i, : len(r)] = torch.tensor(r)
        targets[i, : len(r)] = torch.tensor(r)
    return data[:, :-1], targets[:, 1:]


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to lr / 10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def pretrain(
    model: GPT,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    warmup: int = 100,
) -> float:
    """AdamW on next-token prediction over the packed rows in bf16 autocast; returns the mean loss of the last 50 steps.

    Rows are visited in a fresh seeded permutation each epoch, so the data order is part of the seed.
    """
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norm weights
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95)
    )
    order = torch.randperm(len(inputs), generator=generator)
    cursor, recent = 0, []
    model.train()
    progress = tqdm(range(steps), desc="pretraining", mininterval=5.0)
    for step in progress:
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(inputs), generator=generator), 0
        index = order[cursor : cursor + batch_size]
        cursor += batch_size
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(inputs[index])
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets[index].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-50:]
        progress.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)
    return sum(recent) / max(1, len(recent))


@torch.no_grad()
def answer_exact_match(model: GPT, prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> float:
    """Share of answers (ids ending in EOS) whose every token is the argmax after the right prefix, in one batch.

    This equals exact match under greedy decoding that stops at EOS, because an answer of digits has exactly one
    tokenization; it costs one forward pass instead of a decoding loop.
    """
    rows = [p + a for p, a in zip(prompts, answers)]
    width = max(map(len, rows))
    x = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
    was_training = model.training
    predicted = model.eval()(x).argmax(-1)
    model.train(was_training)
    hits = [
        predicted[i, len(p) - 1 : len(p) + len(a) - 1].tolist() == a for i, (p, a) in enumerate(zip(prompts, answers))
    ]
    return sum(hits) / len(hits)


def prepare_demo(
    out_dir: Path = Path("checkpoints/demo"),
    n_facts: int = DEMO_N_PRETRAIN,
    steps: int = 2000,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = DEMO_SEED,
) -> None:
    """Train the demo tokenizer and pretrain the demo base model; write the checkpoint directory `out_dir`.

    Args:
        out_dir: where `lit_model.pth`, `model_config.yaml`, the tokenizer files and `README.md` go.
        n_facts: number of raw-text facts in the pretraining corpus (`lit_model.data.demo_tasks.pretraining_corpus`).
        steps: optimizer steps of pretraining.
        batch_size: rows of `block_size` tokens per step.
        lr: peak AdamW learning rate (cosine schedule with warm-up).
        seed: seed of the corpus, the initialisation and the data order.
    """
    problems = [f"{name} must be positive, got {value}" for name, value in
                (("n_facts", n_facts), ("steps", steps), ("batch_size", batch_size), ("lr", lr)) if not value > 0]
    if problems:
        raise ValueError("prepare_demo: " + "; ".join(problems))
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer()
    bos_id, eos_id, pad_id = (tokenizer.token_to_id(t) for t in (BOS, EOS, PAD))
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "add_bos_token": True, "add_eos_token": False,
         "model_max_length": 256, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}, indent=2) + "\n")

    config = demo_config(tokenizer.get_vocab_size())
    corpus = pretraining_corpus(n_facts, seed)
    documents = [[bos_id, *e.ids, eos_id] for e in tokenizer.encode_batch(corpus, add_special_tokens=False)]
    inputs, targets = pack_documents(documents, config.block_size, pad_id)
    n_tokens = sum(len(d) for d in documents)
    print(f"corpus: {n_facts} facts, {n_tokens} tokens in {len(inputs)} rows of {config.block_size}")

    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters")
    final_loss = pretrain(model, inputs, targets, steps, batch_size, lr, seed)
    print(f"final pretraining loss (mean of the last 50 steps): {final_loss:.4f}")

    # bfloat16 halves the file (the directory is committed to git). Round-trip now, so the numbers below describe the
    # weights as saved; training casts them to its own precision on load.
    state_dict = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    model.load_state_dict(state_dict)

    # The demo's premise, measured on held-out operands: the skills are there, the instruction format is not.
    def ids(text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [bos_id] * bos + tokenizer.encode(text, add_special_tokens=False).ids + [eos_id] * eos

    facts = raw_facts(500, seed, "val")
    raw_em = answer_exact_match(model, [ids(p, bos=True) for p, _ in facts], [ids(a, eos=True) for _, a in facts],
                                pad_id)
    alpaca = PromptStyle.from_name("alpaca")
    records = make_demo_records(DEMO_N_VAL, seed, "val")
    prompts = [ids(alpaca.apply(r["instruction"], r["input"]), bos=True) for r in records]
    alpaca_em = answer_exact_match(model, prompts, [ids(r["output"], eos=True) for r in records], pad_id)
    print(f"held-out exact match: raw facts {raw_em:.3f}, Alpaca instructions {alpaca_em:.3f}")

    torch.save(state_dict, out_dir / "lit_model.pth")
    config.save(out_dir / "model_config.yaml")
    minutes = (time.perf_counter() - start) / 60
    (out_dir / "README.md").write_text(_readme(config, n_params, n_facts, n_tokens, steps, batch_size, lr, seed,
                                               final_loss, raw_em, alpaca_em, minutes))
    print(f"wrote {out_dir} in {minutes:.1f} min")


def _readme(config: Config, n_params: int, n_facts: int, n_tokens: int, steps: int, batch_size: int, lr: float,
            seed: int, final_loss: float, raw_em: float, alpaca_em: float, minutes: float) -> str:
    return f"""# The demo base model

A tiny Llama-style model ({n_params:,} parameters, {config.n_layer} blocks, n_embd {config.n_embd}, {config.n_head}
query heads sharing {config.n_query_groups} key/value heads, SwiGLU MLP of {config.intermediate_size}, RoPE,
vocabulary {config.vocab_size}, block size {config.block_size}) with a byte-level BPE tokenizer, for the offline
demo: `python finetune/lora.py` with no arguments fine-tunes it on the digit puzzles of `lit_model/data/demo_tasks.py`.

**What it knows.** It was pretrained on {n_facts:,} raw-text facts ({n_tokens:,} tokens) in several phrasings,
such as `reverse of 4721 is 1274`, `4721 sorted is 1247`, `23 + 45 = 68`, `largest digit of 4721 is 7`,
`after 4721 comes 4722`, each between `<s>` and `</s>`; it has never seen an instruction prompt. Its corpus uses only
training-split operands (`lit_model.data.demo_tasks.split_of`), so validation questions are new to it. Measured on
held-out operands at the end of pretraining (greedy exact match, teacher-forced in one batch):

| prompt                                                  | exact match       |
|---------------------------------------------------------|-------------------|
| raw facts, 500 held-out (`raw_facts(500, {seed}, "val")`) | {raw_em:.3f} |
| Alpaca instructions, the demo's validation records      | {alpaca_em:.3f} |

Fine-tuning on the instruction records (`python finetune/lora.py`) teaches the format, and the held-out exact match
rises from the second number towards the first.

**Tokenizer.** Byte-level BPE trained on the task and Alpaca templates only (`tokenizer.json`); digits are split
into single tokens before BPE, so numbers tokenize the same way everywhere. Special tokens: `<s>` (BOS, added to
every prompt: `add_bos_token` is true), `</s>` (EOS), `<pad>`.

**How it was made.** `python scripts/prepare_demo.py` (seed {seed}): AdamW (betas 0.9/0.95, weight decay 0.1 on
matrices), peak learning rate {lr}, 100 warm-up steps then cosine decay to a tenth, {steps} steps of {batch_size}
rows of {config.block_size} tokens (documents packed whole), bfloat16 autocast, gradient clipping at 1.0. Final
training loss {final_loss:.4f}. It took {minutes:.1f} minutes on this machine ({platform.machine()},
{torch.get_num_threads()} threads, torch {torch.__version__}).

**Files.** `lit_model.pth` (state dict in bfloat16, {n_params * 2 / 2**20:.1f} MiB), `model_config.yaml`,
`tokenizer.json`, `tokenizer_config.json`, `generation_config.json`.
"""


if __name__ == "__main__":
    from lit_model.cli import script_main

    script_main(prepare_demo)
