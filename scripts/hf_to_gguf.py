#!/usr/bin/env python3
"""Convert a Hugging Face qwen3_moe checkpoint (bf16 safetensors) to a bf16 GGUF.

Why not llama.cpp's convert_hf_to_gguf.py: it imports torch at module level, and
PyPI's Linux torch wheel pulls several GB of CUDA libraries we cannot use. This
converter needs only numpy and the gguf-py package vendored with llama.cpp, and it
streams: it reads the shards through np.memmap and writes one GGUF tensor at a
time, so a 60 GB checkpoint converts with a few hundred MB of RAM.

It writes the same tensors and metadata as convert_hf_to_gguf.py's Qwen3MoeModel
(names from gguf.TensorNameMap, experts stacked into ffn_{gate,up,down}_exps,
norms and the router in F32, everything else BF16, gpt2 BPE vocab with the
"qwen2" pre-tokenizer). The check that it is right is behavioural: llama.cpp
running the converted tiny-qwen3-moe-coder reproduces the transformers greedy
tokens in shared/models/tiny-qwen3-moe-coder/reference/reference.json
(scripts/check_llamacpp_reference.py).

Usage: hf_to_gguf.py MODEL_DIR OUT.gguf
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np

try:
    import gguf
except ImportError:  # pragma: no cover - message for people running it by hand
    sys.exit("hf_to_gguf.py: needs gguf-py; run scripts/build_llamacpp.sh, then use /work/.peers/venv/bin/python")

# The qwen2 pre-tokenizer regex; llama.cpp's converter identifies pre-tokenizers
# by hashing tokenizer output, which needs transformers. We compare the regex
# itself instead and refuse anything else rather than guess.
QWEN2_PRETOK_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)

ST_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}


class ConvertError(Exception):
    pass


class SafetensorsIndex:
    """Maps tensor names to memory-mapped arrays across the shards of a checkpoint.

    bf16 has no numpy dtype, so BF16 tensors come back as uint16 bit patterns,
    which is exactly what GGUF's BF16 type stores.
    """

    def __init__(self, model_dir: Path):
        self.entries: dict[str, tuple[Path, str, list[int], int, int]] = {}
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (model_dir / "model.safetensors").is_file():
            shards = ["model.safetensors"]
        else:
            raise ConvertError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
        for shard in shards:
            path = model_dir / shard
            with open(path, "rb") as f:
                (hlen,) = struct.unpack("<Q", f.read(8))
                if hlen > 100 * 1024 * 1024:
                    raise ConvertError(f"{path}: header length {hlen} is implausible")
                header = json.loads(f.read(hlen))
            base = 8 + hlen
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                self.entries[name] = (path, info["dtype"], info["shape"], base + start, end - start)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> tuple[str, np.ndarray]:
        if name not in self.entries:
            raise ConvertError(f"tensor {name!r} missing from the checkpoint")
        path, dtype, shape, offset, nbytes = self.entries[name]
        if dtype not in ST_DTYPES:
            raise ConvertError(f"{path}: tensor {name!r} has dtype {dtype}, expected one of {sorted(ST_DTYPES)}")
        np_dtype = ST_DTYPES[dtype]
        count = int(np.prod(shape)) if shape else 1
        if count * np.dtype(np_dtype).itemsize != nbytes:
            raise ConvertError(f"{path}: tensor {name!r} shape {shape} does not match its {nbytes} bytes")
        arr = np.memmap(path, dtype=np_dtype, mode="r", offset=offset, shape=tuple(shape))
        return dtype, arr


def to_f32(dtype: str, arr: np.ndarray) -> np.ndarray:
    if dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def to_bf16_bits(dtype: str, arr: np.ndarray) -> np.ndarray:
    if dtype == "BF16":
        return np.ascontiguousarray(arr)
    # round to nearest even, as torch does
    u = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def hparam(cfg: dict, key: str):
    if key not in cfg:
        raise ConvertError(f"config.json: missing {key!r}")
    return cfg[key]


def write_vocab(w: "gguf.GGUFWriter", model_dir: Path, n_vocab: int) -> None:
    tok_path = model_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise ConvertError(f"{tok_path}: missing (needed for the GGUF vocab)")
    tok = json.loads(tok_path.read_text())
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise ConvertError(f"{tok_path}: model.type is {model.get('type')!r}, expected 'BPE'")
    pre = json.dumps(tok.get("pre_tokenizer"))
    if json.dumps(QWEN2_PRETOK_REGEX)[1:-1] not in pre:
        raise ConvertError(f"{tok_path}: pre_tokenizer is not the qwen2 regex; refusing to guess the llama.cpp pre-tokenizer")
    reverse = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    for i, a in added.items():
        reverse[i] = a["content"]
    if max(reverse) >= n_vocab:
        raise ConvertError(f"{tok_path}: token id {max(reverse)} >= config vocab_size {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    special.add_to_gguf(w, quiet=True)


def plan_tensors(cfg: dict, st: SafetensorsIndex):
    """Yields (gguf_name, numpy shape, ggml type, loader) in file order.

    The loader is called only when the tensor is written, so at most one tensor
    (one layer's stacked experts for the expert tensors) is in memory at a time.
    """
    n_layers = hparam(cfg, "num_hidden_layers")
    n_exp = hparam(cfg, "num_experts")
    sparse_step = cfg.get("decoder_sparse_step", 1)
    dense_layers = set(cfg.get("mlp_only_layers") or [])
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3MOE, n_layers)
    F32, BF16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.BF16

    def single(hf: str, force_f32: bool):
        dtype, arr = st.get(hf)
        name = tmap.get_name(hf.removesuffix(".weight"))
        if name is None:
            raise ConvertError(f"no GGUF name for tensor {hf!r}")
        if force_f32 or arr.ndim <= 1:
            return name + ".weight", tuple(arr.shape), F32, lambda: np.ascontiguousarray(to_f32(*st.get(hf)))
        return name + ".weight", tuple(arr.shape), BF16, lambda: to_bf16_bits(*st.get(hf))

    def stacked(layer: int, proj: str):
        first = f"model.layers.{layer}.mlp.experts.0.{proj}.weight"
        _, arr0 = st.get(first)
        shape = (n_exp, *arr0.shape)
        name = tmap.get_name(f"model.layers.{layer}.mlp.experts.{proj}")

        def load():
            out = np.empty(shape, dtype=np.uint16)
            for e in range(n_exp):
                hf = f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
                dtype, arr = st.get(hf)
                if tuple(arr.shape) != shape[1:]:
                    raise ConvertError(f"tensor {hf!r} has shape {list(arr.shape)}, expected {list(shape[1:])}")
                out[e] = to_bf16_bits(dtype, arr)
            return out

        return name + ".weight", shape, BF16, load

    yield single("model.embed_tokens.weight", False)
    for L in range(n_layers):
        p = f"model.layers.{L}"
        yield single(f"{p}.input_layernorm.weight", True)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield single(f"{p}.self_attn.{proj}.weight", False)
        yield single(f"{p}.self_attn.q_norm.weight", True)
        yield single(f"{p}.self_attn.k_norm.weight", True)
        yield single(f"{p}.post_attention_layernorm.weight", True)
        is_moe = L not in dense_layers and n_exp > 0 and (L + 1) % sparse_step == 0
        if is_moe:
            yield single(f"{p}.mlp.gate.weight", True)  # router stays F32, as llama.cpp's converter does
            for proj in ("gate_proj", "up_proj", "down_proj"):
                yield stacked(L, proj)
        else:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                yield single(f"{p}.mlp.{proj}.weight", False)
    yield single("model.norm.weight", True)
    if not cfg.get("tie_word_embeddings", False):
        yield single("lm_head.weight", False)


def convert(model_dir: Path, out: Path) -> None:
    cfg_path = model_dir / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConvertError(f"{cfg_path}: {e}") from e
    if cfg.get("model_type") != "qwen3_moe":
        raise ConvertError(f"{cfg_path}: model_type is {cfg.get('model_type')!r}, this converter handles 'qwen3_moe'")
    st = SafetensorsIndex(model_dir)

    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3MOE])
    w.add_name(model_dir.name)
    w.add_block_count(hparam(cfg, "num_hidden_layers"))
    w.add_context_length(cfg.get("max_position_embeddings", 4096))
    w.add_embedding_length(hparam(cfg, "hidden_size"))
    w.add_feed_forward_length(cfg.get("intermediate_size", hparam(cfg, "moe_intermediate_size")))
    w.add_head_count(hparam(cfg, "num_attention_heads"))
    w.add_head_count_kv(hparam(cfg, "num_key_value_heads"))
    rope_theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
    if rope_theta is None:
        raise ConvertError(f"{cfg_path}: missing rope_theta (or rope_parameters.rope_theta)")
    w.add_rope_freq_base(float(rope_theta))
    w.add_layer_norm_rms_eps(float(hparam(cfg, "rms_norm_eps")))
    w.add_expert_count(hparam(cfg, "num_experts"))
    w.add_expert_used_count(hparam(cfg, "num_experts_per_tok"))
    w.add_expert_feed_forward_length(hparam(cfg, "moe_intermediate_size"))
    if (hd := cfg.get("head_dim")) is not None:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    write_vocab(w, model_dir, hparam(cfg, "vocab_size"))

    plan = list(plan_tensors(cfg, st))
    for name, shape, qtype, _ in plan:
        item = 4 if qtype == gguf.GGMLQuantizationType.F32 else 2
        nbytes = int(np.prod(shape)) * item
        w.add_tensor_info(name, shape, np.dtype(np.float32 if item == 4 else np.uint16), nbytes,
                          raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (name, shape, _, load) in enumerate(plan):
        data = load()
        if tuple(data.shape) != tuple(shape):
            raise ConvertError(f"tensor {name}: loaded shape {data.shape}, planned {shape}")
        w.write_tensor_data(data)
        if sys.stderr.isatty():
            print(f"\r[hf_to_gguf] {i + 1}/{len(plan)} {name}".ljust(60), end="", file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    w.close()
    tmp.replace(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out", type=Path)
    a = ap.parse_args()
    try:
        convert(a.model_dir, a.out)
    except ConvertError as e:
        sys.exit(f"hf_to_gguf.py: {e}")
    print(f"[hf_to_gguf] wrote {a.out} ({a.out.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
