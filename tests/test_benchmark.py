"""scripts/benchmark.py and its litgpt peer: the rows it reports, its files, and that the peer is the same model."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from lit_model import GPT, Config
from lit_model.peft.lora import LoRAConfig, apply_lora
from lit_model.memory import count_parameters
from tests.finetune_utils import ROOT, load_script

TINY = dict(n_layer=2, n_embd=64, n_head=4, n_query_groups=2, intermediate_size=128, vocab_size=256, block_size=64)

# Architectures the peer covers, each with what makes it differ from plain Llama.
PEER_CONFIGS = {
    "llama-gqa": Config(name="llama-gqa", **TINY),
    "qwen2-attn-bias": Config(name="qwen2", attn_bias=True, rope_base=1e6, norm_eps=1e-6, **TINY),
    "llama3-rope-scaling": Config(name="llama3", rope_adjustments=dict(factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_seq_len=16), **TINY),
    "llama3.2-tied": Config(name="llama3.2", tie_embeddings=True, **TINY),
    "pythia": Config(name="pythia", hf_model_type="gpt_neox", parallel_residual=True, bias=True,
                     rotary_percentage=0.25, norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP",
                     gelu_approximate="none", **{**TINY, "n_query_groups": 4}),
}


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "scripts"))  # the script imports its sibling litgpt_peer at call time too
    yield load_script("scripts/benchmark.py")
    sys.path.remove(str(ROOT / "scripts"))


def test_rows_table_json_and_plot(bench, tmp_path, capsys) -> None:
    rows = bench.benchmark(overrides=TINY, modes=("full", "lora"), rates=(0.875,), checkpointing=(0,), warmup=0,
                           repeats=2, seq_length=32, json_out=tmp_path / "b.json", plot=tmp_path / "b.png")
    assert [(r["mode"], r["drop_rate"]) for r in rows] == [("full", 0.0), ("full", 0.875), ("lora", 0.0),
                                                           ("lora", 0.875)]
    by = {(r["mode"], r["drop_rate"]): r for r in rows}
    for mode in ("full", "lora"):
        base, dropped = by[(mode, 0.0)], by[(mode, 0.875)]
        assert base["realised_drop"] == 0.0 and base["speedup"] == pytest.approx(1.0)
        assert dropped["realised_drop"] > 0.5  # 4 branches at 0.875: almost every mask drops most of them
        assert dropped["saved_for_backward_bytes"] < base["saved_for_backward_bytes"]
        assert dropped["saved_for_backward_bytes"] <= dropped["saved_for_backward_max_bytes"]
        assert base["step_ms"] == pytest.approx(base["forward_ms"] + base["backward_ms"] + base["optimizer_ms"])
        assert base["vs_peers"] == {} and base["cuda_peak_bytes"] is None
        assert base["precision"] == "32-true" and 0 < base["gemm_share"]
    # LoRA trains a sliver of the weights: its gradients and optimizer state are a sliver of full fine-tuning's.
    assert by[("lora", 0.0)]["gradient_bytes"] < by[("full", 0.0)]["gradient_bytes"] / 5
    # AdamW: m and v per parameter (plus the fused kernel's 4-byte step counters)
    assert by[("full", 0.0)]["optimizer_state_bytes"] == pytest.approx(2 * by[("full", 0.0)]["gradient_bytes"], rel=1e-3)
    table = capsys.readouterr().out
    assert table.count("\n| full | ours |") == 2 and "| lora | ours | 0.875" in table
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["results"] == rows and saved["config"]["n_layer"] == 2
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_peer_is_refused(bench) -> None:
    model = GPT(PEER_CONFIGS["llama-gqa"])
    with pytest.raises(ValueError, match=r"Unknown peer\(s\) 'megatron': the peers are hf, litgpt, torchtune"):
        bench.build_peer("megatron", model, "full", 0, 8, torch.device("cpu"), "32-true", torch.zeros(1, 5).long())
    # from the command line: before anything is measured, with every other problem of the arguments
    with pytest.raises(ValueError, match=r"precision '8-true'.*'megatron', 'ds': the peers are hf, litgpt, torchtune"):
        bench.benchmark(overrides=TINY, modes=("full",), peer=["hf", "megatron", "ds"], precisions=("8-true",))


def test_missing_litgpt_says_how_to_install(bench, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "litgpt", None)  # makes `import litgpt` raise ImportError
    with pytest.raises(SystemExit, match="--no-deps litgpt"):
        bench.benchmark(overrides=TINY, modes=("full",), peer="litgpt")


# ---- the litgpt peer: needs the optional litgpt package -------------------------------------------------------------


@pytest.mark.parametrize("name", list(PEER_CONFIGS))
def test_peer_has_our_logits(bench, name) -> None:
    pytest.importorskip("litgpt")
    from litgpt_peer import build_litgpt

    ours = GPT(PEER_CONFIGS[name]).eval()
    ours.init_weights(std=0.2)  # large enough that a wrong q/k/v order or rotary split changes the logits
    for module in ours.modules():  # non-trivial norms and biases, so their mapping is checked too
        for pname, p in module.named_parameters(recurse=False):
            if pname == "bias" or p.ndim == 1:
                torch.nn.init.normal_(p, mean=1.0 if pname == "weight" else 0.0, std=0.3)
    theirs = build_litgpt(ours, None, torch.device("cpu"), torch.float32).eval()
    idx = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx), ours(idx), rtol=1e-4, atol=1e-4)


def test_peer_lora_trains_the_same_parameters(bench) -> None:
    pytest.importorskip("litgpt")
    from litgpt_peer import build_litgpt

    lora = LoRAConfig(r=4, alpha=8, dropout=0.0, query=True, value=True, projection=True, mlp=True)
    ours = apply_lora(GPT(PEER_CONFIGS["llama-gqa"]), lora).eval()
    theirs = build_litgpt(ours, lora, torch.device("cpu"), torch.float32).eval()
    assert count_parameters(theirs) == count_parameters(ours)
    idx = torch.randint(0, 256, (2, 24))
    with torch.no_grad():  # both start with B = 0: the adapted model is the base model
        torch.testing.assert_close(theirs(idx), ours(idx), rtol=1e-4, atol=1e-4)


def test_peer_refuses_what_litgpt_would_compute_differently() -> None:
    pytest.importorskip("litgpt")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from litgpt_peer import litgpt_config
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    with pytest.raises(ValueError, match="sliding_window"):
        litgpt_config(Config(sliding_window=16, **TINY))


def test_benchmark_times_the_peer_in_the_same_rounds(bench, capsys) -> None:
    pytest.importorskip("litgpt")
    rows = bench.benchmark(overrides=TINY, modes=("full", "lora", "qlora"), rates=(0.5,), checkpointing=(0, 1),
                           warmup=0, repeats=1, seq_length=32, peer="litgpt")
    peers = [r for r in rows if r["impl"] == "litgpt"]
    # full and LoRA without checkpointing only: litgpt's fine-tuning has no activation checkpointing, and QLoRA's
    # NF4 path is not the same kernels in both.
    assert [(r["mode"], r["checkpointing"]) for r in peers] == [("full", 0), ("lora", 0)]
    assert all(r["peer_loss_gap"] < 1e-4 for r in peers)
    assert count_match(peers[0], rows, "full") and count_match(peers[1], rows, "lora")
    for r in rows:
        if r["impl"] == "ours":
            compared = r["checkpointing"] == 0 and r["mode"] in ("full", "lora")
            assert bool(r["vs_peers"]) == compared
            if compared:
                peer = next(p for p in peers if p["mode"] == r["mode"])
                assert r["vs_peers"] == {"litgpt": pytest.approx(r["tokens_per_s"] / peer["tokens_per_s"])}
    assert "| full | litgpt | - |" in capsys.readouterr().out


def count_match(peer: dict, rows: list[dict], mode: str) -> bool:
    ours = next(r for r in rows if r["mode"] == mode and r["impl"] == "ours")
    return peer["trainable_params"] == ours["trainable_params"] and peer["weight_bytes"] == ours["weight_bytes"]


# ---- longest sequence and MFU ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fits_up_to, limit, expected", [
    (0, 4096, 0), (100, 4096, 0), (128, 4096, 128), (1000, 4096, 896), (3000, 4096, 2944), (10**6, 4096, 4096),
    (10**6, 600, 512), (10**6, 1000, 896), (700, 600, 512),
])
def test_longest_fitting_finds_the_boundary(bench, fits_up_to, limit, expected) -> None:
    tried = []

    def used(T: int):
        tried.append(T)
        assert T % 128 == 0 and T <= limit
        return T * 10 if T <= fits_up_to else None

    assert bench.longest_fitting(used, limit=limit) == (expected, expected * 10 if expected else None)
    assert len(tried) <= 2 * 6 + 2  # doubling then bisection: logarithmic in the limit


def test_longest_sequence_grows_with_dropbp_on_cpu_budget(bench, capsys) -> None:
    """On CPU, a budget in counted bytes; dropping 7/8 of the backwards saves activations, so longer sequences fit."""
    cfg = dict(TINY, block_size=2048)
    rows = bench.benchmark(overrides=cfg, modes=("lora",), rates=(0.875,), checkpointing=(0,), warmup=0, repeats=1,
                           seq_length=32, longest=True, memory_budget_gib=6 / 1024)
    assert rows  # the timing table still comes first
    out = capsys.readouterr().out
    table = out[out.index("Longest sequence"):]
    lengths = {float(line.split("|")[2]): int(line.split("|")[4]) for line in table.splitlines()
               if line.startswith("| lora |")}
    assert 0 < lengths[0.0] < lengths[0.875] <= 2048
    assert lengths[0.0] % 128 == 0 and lengths[0.875] % 128 == 0


def test_longest_on_cpu_needs_a_budget(bench) -> None:
    with pytest.raises(ValueError, match="memory_budget_gib"):
        bench.benchmark(overrides=TINY, modes=("lora",), checkpointing=(0,), warmup=0, repeats=1, seq_length=16,
                        longest=True, device="cpu")


def test_model_flops_follow_the_palm_formula(bench) -> None:
    config = Config.from_name("Llama-2-7b-hf")
    # 6 N + 12 L T d; Llama 2 7B's published shapes: 32 layers of 4 x 4096^2 attention and 3 x 4096 x 11008 MLP
    # matrices, a 32000 x 4096 LM head (N = 6.61e9: the 6.74e9 parameters less the embedding and the norms).
    n_matrix = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 32000 * 4096
    assert bench.model_flops_per_token(config, 2048) == 6 * n_matrix + 12 * 32 * 2048 * 4096
    assert bench.device_peak_tflops("cpu", "bf16-true") is None


# ---- scripts/benchmark_packing.py ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packing():
    sys.path.insert(0, str(ROOT / "scripts"))
    yield load_script("scripts/benchmark_packing.py")
    sys.path.remove(str(ROOT / "scripts"))


def test_packing_benchmark_covers_the_same_samples_without_padding(packing, tmp_path, capsys) -> None:
    rows = packing.benchmark_packing(samples=16, micro_batch_size=4, warmup_steps=0, rates=(0.0, 0.5),
                                     overrides={**TINY, "block_size": 1024}, json_out=tmp_path / "p.json")
    assert {(r["mode"], r["impl"], r["drop_rate"]) for r in rows} == {
        (m, impl, p) for m in ("full", "lora") for impl in ("ours padded", "ours packed") for p in (0.0, 0.5)
    } | {("full", "litgpt padded", 0.0), ("lora", "litgpt padded", 0.0)}
    lengths = json.loads((tmp_path / "p.json").read_text())["lengths"]
    for r in rows:
        assert r["useful_tokens"] == sum(n - 1 for n in lengths)  # 16 samples, 4 full micro-batches: all of them
        if r["impl"] == "ours packed":
            assert r["computed_tokens"] == r["useful_tokens"]  # no padding at all
        else:
            assert r["computed_tokens"] > r["useful_tokens"]  # padded to the longest of each micro-batch
    assert "| full | ours packed | 0 |" in capsys.readouterr().out


def test_alpaca_like_lengths_are_seeded_and_long_tailed(packing) -> None:
    a, b = packing.alpaca_like_lengths(4000, seed=1), packing.alpaca_like_lengths(4000, seed=1)
    assert a == b and a != packing.alpaca_like_lengths(4000, seed=2)
    a.sort()
    assert 110 <= a[2000] <= 130 and 240 <= a[3600] <= 280 and min(a) >= 24 and max(a) <= 1024  # median, p90


def test_packing_benchmark_refuses_a_packed_step_that_differs(packing, monkeypatch) -> None:
    # Segments ignored (one long causal row): the packed loss then differs from the padded one, and the run stops.
    real = packing.collate_packed
    monkeypatch.setattr(packing, "collate_packed", lambda s: {**real(s), "segments": None})
    with pytest.raises(RuntimeError, match="packed loss .* != padded loss"):
        packing.benchmark_packing(samples=8, micro_batch_size=4, warmup_steps=0, rates=(0.0,), peer=None,
                                  modes=("full",), overrides={**TINY, "block_size": 1024})
