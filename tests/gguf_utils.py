"""Writing GGUF files of tiny Hugging Face models the way llama.cpp's `convert_hf_to_gguf.py` does, for tests.

`write_gguf(hf_model, tokenizer_dir, path)` writes the metadata keys, the tokenizer (a byte-level BPE tokenizer.json
as "gpt2", a SentencePiece tokenizer.model as "llama"), the tensors under llama.cpp's names with the attn_q/attn_k
rows permuted (llama only), norms in F32 and the matrices in the chosen ggml type (quantized with
`gguf.quants.quantize`). transformers' GGUF loader then reads the file back as the oracle.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

# HF module -> llama.cpp module (the leaf, weight or bias, carries through)
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|begin_of_text|>' + message['role'] + '\\n' + message['content'] + "
    "'<|end_of_text|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|begin_of_text|>assistant\\n' }}{% endif %}"
)


def gguf_name(hf_name: str) -> str:
    module, _, leaf = hf_name.rpartition(".")
    if module in _TOP:
        return f"{_TOP[module]}.{leaf}"
    parts = module.split(".")  # model.layers.N.<sub>
    return f"blk.{parts[2]}.{_BLOCK['.'.join(parts[3:])]}.{leaf}"


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's HF -> GGUF row permutation of q_proj / k_proj (half-split RoPE -> interleaved pairs)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape
    )


def llama3_rope_freqs(config: Any) -> np.ndarray:
    """llama.cpp's `rope_freqs.weight` for a Llama 3.1-style rope_scaling: the divisor of each frequency."""
    scaling = config.rope_parameters
    base, dim = scaling["rope_theta"], config.head_dim
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    divisors = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            divisors.append(1.0)
        elif wavelen > old_len / low:
            divisors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


def write_gguf(
    hf_model: Any,
    tokenizer_dir: Path,
    path: Path,
    qtype: str = "F32",
    pre: Optional[str] = "gpt-2",
    add_bos_token: Optional[bool] = True,
    chat_template: Optional[str] = CHAT_TEMPLATE,
    metadata: Optional[dict[str, Any]] = None,
    tensor_types: Optional[dict[str, str]] = None,
    extra_tensors: Optional[dict[str, np.ndarray]] = None,
    skip_tensors: tuple[str, ...] = (),
) -> Path:
    """Write `hf_model` (a tiny LlamaForCausalLM or Qwen2ForCausalLM) and the tokenizer in `tokenizer_dir` as GGUF.

    `qtype` is the ggml type of the 2-D tensors (F32, F16, BF16, Q8_0, Q4_0, Q4_1, ...); `tensor_types` overrides it
    per GGUF tensor name (integer types such as I32 too). `metadata` adds or replaces key/value pairs, or removes
    them (value None); {"general.architecture": "phi2"} renames the architecture. `extra_tensors` adds or replaces
    F32 tensors by name; `skip_tensors` leaves tensors out by GGUF name.
    """
    import gguf

    config = hf_model.config
    arch = {"llama": "llama", "qwen2": "qwen2"}[config.model_type]
    extra = dict(metadata or {})
    arch = extra.pop("general.architecture", arch)
    writer = gguf.GGUFWriter(path, arch)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name("Tiny Test Model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    _add_tokenizer(writer, Path(tokenizer_dir), pre, add_bos_token, chat_template)
    for key, value in extra.items():
        if value is None:
            writer.kv_data[0].pop(key, None)
        elif isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, value)

    extra_tensors = dict(extra_tensors or {})
    if config.model_type == "llama" and config.rope_parameters.get("rope_type") == "llama3":
        extra_tensors.setdefault("rope_freqs.weight", llama3_rope_freqs(config))
    for name, data in extra_tensors.items():
        writer.add_tensor(name, np.asarray(data, dtype=np.float32))
    tied = config.tie_word_embeddings
    for hf_name, tensor in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp writes the head only when it is not the embedding
        name = gguf_name(hf_name)
        if name in skip_tensors:
            continue
        data = tensor.detach().float().numpy()
        if config.model_type == "llama" and ".attn_q." in name:
            data = permute(data, config.num_attention_heads)
        elif config.model_type == "llama" and ".attn_k." in name:
            data = permute(data, config.num_key_value_heads)
        kind = (tensor_types or {}).get(name, qtype if data.ndim == 2 else "F32")  # norms and biases stay F32
        ggml_type = gguf.GGMLQuantizationType[kind]
        if kind == "F32":
            writer.add_tensor(name, data.astype(np.float32))
        elif kind == "F16":
            writer.add_tensor(name, data.astype(np.float16))
        elif kind in ("I8", "I16", "I32"):
            writer.add_tensor(name, data.astype(getattr(np, f"int{kind[1:]}")))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, ggml_type), raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(
    writer: Any, directory: Path, pre: Optional[str], add_bos_token: Optional[bool], chat_template: Optional[str]
) -> None:
    """The tokenizer keys, as llama.cpp's converter writes them for a tokenizer.json (BPE) or tokenizer.model."""
    import gguf

    config = json.loads((directory / "tokenizer_config.json").read_text())
    if (directory / "tokenizer.json").is_file():
        data = json.loads((directory / "tokenizer.json").read_text())
        vocab = dict(data["model"]["vocab"])
        added = {t["id"]: t for t in data["added_tokens"]}
        for token in added.values():
            vocab[token["content"]] = token["id"]
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
        types = [
            (gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
            if i in added
            else gguf.TokenType.NORMAL
            for i in range(len(tokens))
        ]
        merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
        writer.add_tokenizer_model("gpt2")
        if pre is not None:
            writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
    else:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
        tokens, scores, types = [], [], []
        for i in range(sp.vocab_size()):
            tokens.append(sp.id_to_piece(i))
            scores.append(sp.get_score(i))
            kind = gguf.TokenType.NORMAL
            if sp.is_unknown(i):
                kind = gguf.TokenType.UNKNOWN
            elif sp.is_control(i):
                kind = gguf.TokenType.CONTROL
            elif sp.is_unused(i):
                kind = gguf.TokenType.UNUSED
            elif sp.is_byte(i):
                kind = gguf.TokenType.BYTE
            types.append(kind)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(True)
        writer.add_unk_token_id(sp.unk_id())
    ids = {t: i for i, t in enumerate(tokens)}
    writer.add_bos_token_id(ids[config["bos_token"]])
    writer.add_eos_token_id(ids[config["eos_token"]])
    if add_bos_token is not None:
        writer.add_add_bos_token(add_bos_token)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def tiny_llama(variant: str = "llama", vocab_size: int = 302, seed: int = 0, **overrides: Any) -> Any:
    """A tiny random HF model whose matrices have rows of 64 or 96 (quantization blocks are 32 wide).

    Weights re-initialised with std 0.2 as in tests/hf_models.py, so mapping errors show in the logits.
    """
    from tests.hf_models import hf_config
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(hidden_size=64, intermediate_size=96, vocab_size=vocab_size, num_key_value_heads=2)
    kwargs.update(overrides)
    config = hf_config(variant, **kwargs)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.2
            param.copy_(noise + 1.0 if param.ndim == 1 and "norm" in name else noise)
    return model
