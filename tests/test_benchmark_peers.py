"""The hf and torchtune peers of scripts/benchmark.py compute our model and step; several peers and precisions in one
run; the GEMM ceiling the rows are measured against."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from lit_model import GPT, Config
from lit_model.hf.convert import hf_module, lit_to_hf
from lit_model.peft.lora import LoRAConfig, LoRALinear, apply_lora
from lit_model.memory import count_parameters
from lit_model.precision import param_dtype
from tests.finetune_utils import ROOT, load_script

TINY = dict(n_layer=2, n_embd=64, n_head=4, n_query_groups=2, intermediate_size=128, vocab_size=256, block_size=64)
LLAMA = Config(name="llama-gqa", **TINY)
LORA = LoRAConfig(r=4, alpha=8, dropout=0.0, query=True, value=True, projection=True, mlp=True)
CPU = torch.device("cpu")

# Architectures the hf peer's full fine-tuning covers, each with what makes it differ from plain Llama.
HF_CONFIGS = {
    "llama-gqa": LLAMA,
    "qwen2-attn-bias": Config(name="qwen2", hf_model_type="qwen2", attn_bias=True, rope_base=1e6, norm_eps=1e-6,
                              **TINY),
    "llama3-rope-scaling": Config(name="llama3", rope_adjustments=dict(factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_seq_len=16), **TINY),
    "llama3.2-tied": Config(name="llama3.2", tie_embeddings=True, **TINY),
    "pythia": Config(name="pythia", hf_model_type="gpt_neox", parallel_residual=True, bias=True,
                     rotary_percentage=0.25, norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP",
                     gelu_approximate="none", **{**TINY, "n_query_groups": 4}),
}


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "scripts"))  # the script imports its sibling peer modules at call time too
    yield load_script("scripts/benchmark.py")
    sys.path.remove(str(ROOT / "scripts"))


@pytest.fixture()
def hf_peer(bench):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import hf_peer

    return hf_peer


@pytest.fixture()
def torchtune_peer(bench):
    pytest.importorskip("torchtune")
    import torchtune_peer

    return torchtune_peer


def telling_model(config: Config, lora: LoRAConfig | None = None, dtype: torch.dtype = torch.float32) -> GPT:
    """Weights at std 0.2, non-trivial norms and biases, LoRA B not zero: a wrong layout changes the loss (at the
    default std 0.02 the logits are near zero and hide it; a fresh B is zero and would hide the adapters')."""
    model = GPT(config)
    model.init_weights(std=0.2)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "bias" or p.ndim == 1:
                torch.nn.init.normal_(p, mean=1.0 if name == "weight" else 0.0, std=0.3)
    if lora is not None:
        apply_lora(model, lora)
        for module in model.modules():
            if isinstance(module, LoRALinear):
                torch.nn.init.normal_(module.lora_B, std=0.2)
    return model.to(dtype).train()


# ---- the hf peer: transformers (and PEFT) ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_peer_has_our_logits(hf_peer, name) -> None:
    ours = telling_model(HF_CONFIGS[name]).eval()
    theirs = hf_peer.build(ours, None, CPU, torch.float32).eval()
    idx = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_hf_peer_has_our_loss_and_gradients(bench, hf_peer, mode, precision) -> None:
    dtype = param_dtype(precision)
    lora = LORA if mode == "lora" else None
    ours = telling_model(LLAMA, lora, dtype)
    theirs = hf_peer.build(ours, lora, CPU, dtype).train()
    assert count_parameters(theirs) == count_parameters(ours)  # the same trainable parameters, LoRA or full
    tokens = torch.randint(0, 256, (2, 25))
    our_loss, their_loss = bench.step_loss(ours, tokens), hf_peer.loss(theirs, tokens)
    if dtype == torch.float32:
        torch.testing.assert_close(their_loss, our_loss, rtol=1e-5, atol=1e-5)
    else:  # bf16 activations rounded at other places (measured: 3e-5 relative); both reduce the loss in float32
        gap = abs(float(their_loss.detach()) - float(our_loss.detach()))
        assert gap <= 1e-3 * float(our_loss.detach()), gap  # 10x tighter than the benchmark refuses at
        return
    our_loss.backward()
    their_loss.backward()
    their_grads = {n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters()
                   if p.requires_grad}
    if lora is None:  # every weight's gradient, through the export map
        ours_grads = dict(lit_to_hf(((n, p.grad) for n, p in ours.named_parameters()), LLAMA))
    else:  # each adapter's A and B gradients
        ours_grads = {f"{hf_module(n, LLAMA).name}.lora_{ab}.default.weight": getattr(m, f"lora_{ab}").grad
                      for n, m in ours.named_modules() if isinstance(m, LoRALinear) for ab in "AB"}
    assert set(their_grads) == set(ours_grads)
    for key, grad in ours_grads.items():
        torch.testing.assert_close(their_grads[key], grad, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("every, expected", [(1, [True, True]), (2, [True, False])])
def test_hf_peer_uses_its_own_activation_checkpointing(bench, hf_peer, every, expected) -> None:
    ours = telling_model(LLAMA, LORA)
    theirs = hf_peer.build(ours, LORA, CPU, torch.float32, every=every).train()
    assert [layer.gradient_checkpointing for layer in theirs.base_model.model.model.layers] == expected
    tokens = torch.randint(0, 256, (2, 25))
    torch.testing.assert_close(hf_peer.loss(theirs, tokens), bench.step_loss(ours, tokens), rtol=1e-5, atol=1e-5)


def test_hf_peer_steps_with_the_trainers_default_adamw(hf_peer) -> None:
    from transformers import TrainingArguments

    # The fact the peer follows: with torch >= 2.8 a default TrainingArguments asks for torch's fused AdamW.
    assert TrainingArguments.__dataclass_fields__["optim"].default == "adamw_torch_fused"
    optimizer = hf_peer.optimizer(hf_peer.build(telling_model(LLAMA), None, CPU, torch.float32), lr=1e-5)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
    assert optimizer.defaults["weight_decay"] == 0.0


def test_hf_peer_refuses_lora_on_fused_projections(hf_peer) -> None:
    ours = telling_model(HF_CONFIGS["pythia"], LORA)
    with pytest.raises(ValueError, match="gpt_neox fuses .*query_key_value"):
        hf_peer.build(ours, LORA, CPU, torch.float32)


def test_missing_transformers_says_how_to_install(bench, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(SystemExit, match=r"--peer hf needs transformers and peft.*pip install -e"):
        bench.benchmark(overrides=TINY, modes=("full",), peer="hf")


def test_a_peer_with_another_loss_is_refused(bench, hf_peer, monkeypatch) -> None:
    real = hf_peer.loss
    monkeypatch.setattr(hf_peer, "loss", lambda model, tokens: real(model, tokens) * 1.001)
    with pytest.raises(RuntimeError, match=r"hf's loss .* differs from ours .*full, 32-true"):
        bench.benchmark(overrides=TINY, modes=("full",), checkpointing=(0,), warmup=0, repeats=1, seq_length=16,
                        peer="hf")


# ---- the torchtune peer (optional: see scripts/torchtune_peer.py for what it takes to install) -----------------------


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_torchtune_peer_has_our_loss(bench, torchtune_peer, mode) -> None:
    lora = LORA if mode == "lora" else None
    ours = telling_model(LLAMA, lora)  # B != 0: the adapters' rows of the query must be permuted like its weight
    theirs = torchtune_peer.build(ours, lora, CPU, torch.float32).train()
    assert count_parameters(theirs) == count_parameters(ours)
    tokens = torch.randint(0, 256, (2, 33))
    torch.testing.assert_close(torchtune_peer.loss(theirs, tokens), bench.step_loss(ours, tokens), rtol=1e-5,
                               atol=1e-5)
    assert torchtune_peer.optimizer(theirs, lr=1e-5).defaults["fused"] is True


def test_missing_torchtune_says_how_to_install(bench, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchtune", None)
    with pytest.raises(SystemExit, match=r"torchtune and torchao .*\.\[torchtune\].*torchao >= 0\.16, < 0\.18"):
        bench.benchmark(overrides=TINY, modes=("lora",), peer="torchtune")


def test_torchtune_peer_refuses_what_its_llama_computes_differently(torchtune_peer) -> None:
    with pytest.raises(ValueError, match="biases, tied embeddings"):
        torchtune_peer.build(GPT(Config(attn_bias=True, tie_embeddings=True, **TINY)), None, CPU, torch.float32)
    assert torchtune_peer.covers_checkpointing(1) and not torchtune_peer.covers_checkpointing(2)


# ---- several peers and precisions in one run -------------------------------------------------------------------------


def test_cli_runs_two_peers_and_two_precisions_in_the_same_rounds(bench, hf_peer, tmp_path, capsys) -> None:
    pytest.importorskip("litgpt")
    from jsonargparse import CLI

    rows = CLI(bench.benchmark, as_positional=False, args=[
        "--overrides", json.dumps(TINY), "--modes", "[full,lora,qlora]", "--rates", "[0.5]", "--checkpointing",
        "[0,1]", "--peer", "[hf,litgpt]", "--precisions", "[32-true,bf16-true]", "--warmup", "0", "--repeats", "1",
        "--seq_length", "32", "--json_out", str(tmp_path / "b.json")])
    for precision in ("32-true", "bf16-true"):
        mine = [r for r in rows if r["precision"] == precision]
        peers = {(r["impl"], r["mode"], r["checkpointing"]) for r in mine if r["impl"] != "ours"}
        # hf has activation checkpointing, litgpt none; neither compares QLoRA
        assert peers == {("hf", "full", 0), ("hf", "full", 1), ("hf", "lora", 0), ("hf", "lora", 1),
                         ("litgpt", "full", 0), ("litgpt", "lora", 0)}
        tolerance = bench.LOSS_TOLERANCE[param_dtype(precision)]
        assert all(r["peer_loss_gap"] <= tolerance * 10 for r in mine if r["impl"] != "ours")
        for r in mine:
            assert r["gemm_share"] == pytest.approx(r["model_tflops"] / json.loads(
                (tmp_path / "b.json").read_text())["gemm_ceiling"][precision]["tflops"])
            if r["impl"] != "ours":
                continue
            expected = set() if r["mode"] == "qlora" else {"hf"} if r["checkpointing"] else {"hf", "litgpt"}
            assert set(r["vs_peers"]) == expected  # every DropBP rate against the peer's plain step
            for name, ratio in r["vs_peers"].items():
                peer = next(p for p in mine if (p["impl"], p["mode"], p["checkpointing"]) ==
                            (name, r["mode"], r["checkpointing"]))
                assert ratio == pytest.approx(r["tokens_per_s"] / peer["tokens_per_s"])
    full = {(r["precision"], r["impl"]): r for r in rows if r["mode"] == "full" and r["checkpointing"] == 0
            and r["drop_rate"] == 0}
    for impl in ("ours", "hf", "litgpt"):  # bf16-true: the weights in bf16, for ours and the peers alike
        assert full[("bf16-true", impl)]["weight_bytes"] == full[("32-true", impl)]["weight_bytes"] // 2
    out = capsys.readouterr().out
    assert out.count("GEMM ceiling (") == 2 and "; bf16-true; batch 2 x 32" in out
    assert out.count("| ours / hf | ours / litgpt | speed-up (ideal) |") == 2
    assert out.count("| % of GEMM ceiling |") == 2 and "| full | hf | - | 1 |" in out


def test_one_peer_by_name_and_lists(bench) -> None:
    assert bench.peer_names("litgpt") == ("litgpt",)
    assert bench.peer_names(["hf", "litgpt", "hf"]) == ("hf", "litgpt")
    assert bench.peer_names("hf, litgpt") == ("hf", "litgpt") and bench.peer_names(None) == ()


def test_precision_arguments_are_checked_together(bench) -> None:
    with pytest.raises(ValueError, match="--precision or --precisions, not both"):
        bench.benchmark(overrides=TINY, precision="32-true", precisions=("bf16-true",))
    with pytest.raises(ValueError, match="unknown mode.*'dora'.*--peer compares the modes full and lora"):
        bench.benchmark(overrides=TINY, modes=("dora",), peer="hf")


# ---- the GEMM ceiling ------------------------------------------------------------------------------------------------


def test_gemm_ceiling_covers_the_models_matrix_products(bench) -> None:
    config = Config(**TINY)
    shapes = bench.linear_shapes(config)
    # The shapes are the PaLM count's N: 6 N of model_flops_per_token (without attention's 12 L T d).
    n_matrix = sum(count * k * n for _, k, n, count in shapes)
    attention = 12 * config.n_layer * 32 * config.n_head * config.head_size
    assert 6 * n_matrix + attention == bench.model_flops_per_token(config, 32)
    ceiling = bench.gemm_ceiling(config, 64, torch.bfloat16, CPU, warmup=0, repeats=2)
    assert ceiling.dtype == "bfloat16" and ceiling.tokens == 64
    # distinct (in, out) once each: q and proj are both 64 x 64 here, k and v 64 x 32, fc_1 and fc_2 64 x 128
    assert [(s["in_features"], s["out_features"], s["per_step"]) for s in ceiling.shapes] == [
        (64, 64, 4), (64, 32, 4), (64, 128, 4), (128, 64, 2), (64, 256, 1)]
    rates = [s["tflops"] for s in ceiling.shapes]
    # a FLOPs-weighted harmonic mean of the shapes' rates: between the slowest and the fastest
    assert min(rates) <= ceiling.tflops <= max(rates) == ceiling.best_tflops
