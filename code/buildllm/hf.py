"""Hugging Face GPT-2 checkpoints in and out of `buildllm.model.GPT`.

Taught in Chapter 8 (pretraining). `load_hf_gpt2` reads GPT-2's published files (or any
`GPT2LMHeadModel` state dict) into our GPT; `export_hf` writes a folder that
`transformers.GPT2LMHeadModel.from_pretrained` loads with the same logits. GPT-2 stores
its projections in `Conv1D` modules, (in, out) where nn.Linear is (out, in): the loader
and the exporter transpose them. Its fused `c_attn` is our `w_qkv`, Q, K, V in order.
The two tables in this module are the only place Hugging Face's names appear.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from buildllm.model import GPT, GPTConfig

# Our GPTConfig field -> the GPT2Config (config.json) field of the same meaning.
HF_GPT2_CONFIG_NAMES = {
    "vocab_size": "vocab_size",
    "context_length": "n_positions",
    "d_model": "n_embd",
    "n_layers": "n_layer",
    "n_heads": "n_head",
    "d_ff": "n_inner",
    "norm_eps": "layer_norm_epsilon",
    "tie_embeddings": "tie_word_embeddings",
}

# Our state-dict key -> GPT-2's key ({i}: block index), and whether it is a Conv1D
# weight to transpose.
HF_GPT2_WEIGHT_NAMES: dict[str, tuple[str, bool]] = {
    "tok_emb.weight": ("wte.weight", False),
    "pos_emb.weight": ("wpe.weight", False),
    "blocks.{i}.norm1.weight": ("h.{i}.ln_1.weight", False),
    "blocks.{i}.norm1.bias": ("h.{i}.ln_1.bias", False),
    "blocks.{i}.attn.w_qkv.weight": ("h.{i}.attn.c_attn.weight", True),
    "blocks.{i}.attn.w_qkv.bias": ("h.{i}.attn.c_attn.bias", False),
    "blocks.{i}.attn.w_o.weight": ("h.{i}.attn.c_proj.weight", True),
    "blocks.{i}.attn.w_o.bias": ("h.{i}.attn.c_proj.bias", False),
    "blocks.{i}.norm2.weight": ("h.{i}.ln_2.weight", False),
    "blocks.{i}.norm2.bias": ("h.{i}.ln_2.bias", False),
    "blocks.{i}.mlp.w_up.weight": ("h.{i}.mlp.c_fc.weight", True),
    "blocks.{i}.mlp.w_up.bias": ("h.{i}.mlp.c_fc.bias", False),
    "blocks.{i}.mlp.w_down.weight": ("h.{i}.mlp.c_proj.weight", True),
    "blocks.{i}.mlp.w_down.bias": ("h.{i}.mlp.c_proj.bias", False),
    "final_norm.weight": ("ln_f.weight", False),
    "final_norm.bias": ("ln_f.bias", False),
}
HF_LM_HEAD = "lm_head.weight"
# Our key -> Llama's (LlamaForCausalLM: nn.Linear, nothing to transpose); a tuple of
# keys is stacked along the output dimension. Used to check the modern preset
# (RMSNorm, SwiGLU, RoPE with "half" pairing, GQA) against Llama.
HF_LLAMA_WEIGHT_NAMES: dict[str, str | tuple[str, ...]] = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "blocks.{i}.norm1.weight": "model.layers.{i}.input_layernorm.weight",
    "blocks.{i}.attn.w_qkv.weight": tuple(
        f"model.layers.{{i}}.self_attn.{n}_proj.weight" for n in "qkv"
    ),
    "blocks.{i}.attn.w_o.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blocks.{i}.norm2.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blocks.{i}.mlp.w_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blocks.{i}.mlp.w_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blocks.{i}.mlp.w_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
HF_LLAMA_CONFIG_NAMES = {
    "vocab_size": "vocab_size",
    "context_length": "max_position_embeddings",
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "d_ff": "intermediate_size",
    "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
}
# Causal-mask buffers that older checkpoints (GPT-2's own files) store as weights.
HF_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def gpt2_state_dict_from_hf(hf_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename and transpose a GPT-2 state dict into our GPT's keys.

    Accepts keys with or without the "transformer." prefix (GPT2LMHeadModel vs the
    published files); drops the stored causal-mask buffers; keeps `lm_head.weight` only
    when it differs from `wte.weight` (an untied head).
    Raises ValueError naming missing or unexpected keys.
    """
    sd = {k.removeprefix("transformer."): v for k, v in hf_state_dict.items()}
    sd = {k: v for k, v in sd.items() if not k.endswith(HF_IGNORED_SUFFIXES)}
    n_layers = 1 + max(
        (int(k.split(".")[1]) for k in sd if k.startswith("h.")), default=-1
    )
    ours: dict[str, Tensor] = {}
    used = set()
    for our_key, (hf_key, transpose) in HF_GPT2_WEIGHT_NAMES.items():
        for i in range(n_layers) if "{i}" in our_key else [0]:
            src = hf_key.format(i=i)
            _require(sd, [src])
            ours[our_key.format(i=i)] = sd[src].t() if transpose else sd[src]
            used.add(src)
    if HF_LM_HEAD in sd:
        used.add(HF_LM_HEAD)
        if not torch.equal(sd[HF_LM_HEAD], sd["wte.weight"]):
            ours["lm_head.weight"] = sd[HF_LM_HEAD]
    unexpected = sorted(set(sd) - used)
    if unexpected:
        raise ValueError(
            f"not a GPT-2 state dict: unexpected keys {unexpected[:5]}; load only "
            "GPT2LMHeadModel / GPT2Model checkpoints"
        )
    return {k: v.contiguous() for k, v in ours.items()}


def gpt2_state_dict_to_hf(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename and transpose our GPT's state dict into GPT2LMHeadModel's keys.

    The inverse of `gpt2_state_dict_from_hf`; keys get the "transformer." prefix and
    `lm_head.weight` is written only for an untied head.
    """
    n_layers = 1 + max(
        int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")
    )
    hf: dict[str, Tensor] = {}
    for our_key, (hf_key, transpose) in HF_GPT2_WEIGHT_NAMES.items():
        for i in range(n_layers) if "{i}" in our_key else [0]:
            w = state_dict[our_key.format(i=i)]
            hf[hf_key.format(i=i)] = w.t() if transpose else w
    hf = {f"transformer.{k}": v.detach().cpu().contiguous() for k, v in hf.items()}
    head, emb = state_dict["lm_head.weight"], state_dict["tok_emb.weight"]
    if head.data_ptr() != emb.data_ptr():  # untied: its own matrix
        hf[HF_LM_HEAD] = head.detach().cpu().contiguous()
    return hf


def config_from_hf(hf_config: Mapping[str, Any]) -> GPTConfig:
    """Translate a GPT-2 `config.json` into a GPTConfig.

    Fields missing from the file take GPT2Config's defaults, which are ours.
    Raises ValueError for GPT-2 options our model does not implement.
    """
    activation = hf_config.get("activation_function", "gelu_new")
    unsupported = {
        "activation_function": activation not in ("gelu_new", "gelu_pytorch_tanh"),
        "scale_attn_weights": not hf_config.get("scale_attn_weights", True),
        "scale_attn_by_inverse_layer_idx": hf_config.get(
            "scale_attn_by_inverse_layer_idx", False
        ),
    }
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(
            f"GPT-2 config options {bad} are not implemented by buildllm's GPT; "
            "only the original GPT-2 architecture (tanh GELU, 1/sqrt(d_k)) loads"
        )
    # A missing field takes GPT2Config's default, which is also ours (GPT-2 small).
    names = HF_GPT2_CONFIG_NAMES.items()
    fields = {
        ours: hf_config[hf] for ours, hf in names if hf_config.get(hf) is not None
    }
    return GPTConfig(**fields, dropout=hf_config.get("resid_pdrop", 0.0))


def config_to_hf(config: GPTConfig) -> dict[str, Any]:
    """Translate a GPT-2-style GPTConfig into the fields of a GPT-2 `config.json`.

    Raises ValueError if the config uses what GPT-2 lacks (RoPE, RMSNorm, ...).
    """
    gpt2 = GPTConfig()
    must_match = ["norm", "mlp", "pos", "bias"]
    bad = [
        f"{n}={getattr(config, n)!r}"
        for n in must_match
        if getattr(config, n) != getattr(gpt2, n)
    ]
    if config.n_kv_heads not in (None, config.n_heads):
        bad.append(f"n_kv_heads={config.n_kv_heads}")
    if bad:
        raise ValueError(
            f"GPT-2's format cannot hold {', '.join(bad)}; export a GPT-2-style "
            "model (GPTConfig.from_preset('gpt2-124m', ...))"
        )
    fields = {
        theirs: getattr(config, ours) for ours, theirs in HF_GPT2_CONFIG_NAMES.items()
    }
    pdrop = {k: config.dropout for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "n_ctx": config.context_length,
        **fields,
        **pdrop,
    }


def llama_state_dict_from_hf(hf_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a LlamaForCausalLM state dict to our keys (for a "modern" GPTConfig).

    Raises ValueError naming missing keys.
    """
    n_layers = sum(k.endswith("input_layernorm.weight") for k in hf_state_dict)
    ours = {}
    for our_key, hf_key in HF_LLAMA_WEIGHT_NAMES.items():
        for i in range(n_layers) if "{i}" in our_key else [0]:
            names = hf_key if isinstance(hf_key, tuple) else (hf_key,)
            keys = [name.format(i=i) for name in names]
            if keys == [HF_LM_HEAD] and HF_LM_HEAD not in hf_state_dict:
                continue  # tied head: the embedding serves
            _require(hf_state_dict, keys)
            ours[our_key.format(i=i)] = torch.cat([hf_state_dict[k] for k in keys])
    return ours


def llama_config_to_hf(config: GPTConfig) -> dict[str, Any]:
    """Translate a modern GPTConfig into LlamaConfig's fields.

    Raises ValueError if the config is not Llama's architecture.
    """
    need = {"norm": "rmsnorm", "mlp": "swiglu", "pos": "rope", "bias": False}
    need["rope_pairing"] = "half"
    bad = [
        f"{n}={getattr(config, n)!r}"
        for n, v in need.items()
        if getattr(config, n) != v
    ]
    if bad:
        raise ValueError(f"Llama's architecture cannot hold {', '.join(bad)}")
    fields = {hf: getattr(config, ours) for ours, hf in HF_LLAMA_CONFIG_NAMES.items()}
    fields[HF_LLAMA_CONFIG_NAMES["n_kv_heads"]] = config.n_kv_heads or config.n_heads
    rope = {"rope_type": "default", "rope_theta": config.rope_base}
    return {
        **fields,
        "hidden_act": "silu",
        "rope_parameters": rope,
        "model_type": "llama",
    }


def load_hf_gpt2(
    source: str | os.PathLike | Mapping[str, Tensor], config: GPTConfig | None = None
) -> GPT:
    """Build a GPT holding GPT-2 weights from a folder, a file or a state dict.

    `source` is a folder with `config.json` and `model.safetensors` or
    `pytorch_model.bin` (what `huggingface-cli download gpt2` or `save_pretrained`
    writes), one such weights file, or a state dict (`GPT2LMHeadModel.state_dict()`).
    Without `config` and without a `config.json`, the shapes give the sizes and the
    head count is d_model / 64, true of every published GPT-2. The model comes back in
    eval mode, as from `from_pretrained`.
    Raises FileNotFoundError for a missing path, ValueError for a non-GPT-2 checkpoint.
    """
    hf_config: Mapping[str, Any] | None = None
    if isinstance(source, Mapping):
        hf_sd = source
    else:
        path = Path(source)
        if path.is_dir():
            if (path / "config.json").exists():
                hf_config = json.loads((path / "config.json").read_text())
            candidates = [path / "model.safetensors", path / "pytorch_model.bin"]
            path = next((p for p in candidates if p.exists()), candidates[0])
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist; pass a folder with config.json and "
                "model.safetensors (or pytorch_model.bin), or one of those files"
            )
        hf_sd = read_weights(path)
    state_dict = gpt2_state_dict_from_hf(hf_sd)
    if config is None:
        config = config_from_hf(hf_config) if hf_config else infer_config(state_dict)
    if config.tie_embeddings and "lm_head.weight" in state_dict:
        raise ValueError(
            "the checkpoint has its own lm_head.weight but the config ties it to "
            "tok_emb; pass a config with tie_embeddings=False"
        )
    model = GPT(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [
        k for k in missing if not (k == "lm_head.weight" and config.tie_embeddings)
    ]
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint does not fit {config}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model.eval()  # as from_pretrained: dropout off until model.train()


def export_hf(model: GPT, folder: str | os.PathLike, eot_id: int | None = None) -> Path:
    """Write `config.json` and `model.safetensors` that transformers loads as GPT-2.

    `GPT2LMHeadModel.from_pretrained(folder)` then gives our model's logits. `eot_id`
    (the tokenizer's end-of-text id) is written as bos/eos token id when given. Each
    file is written to a temporary name and renamed. Returns the folder.
    Raises ValueError for a model GPT-2's format cannot hold.
    """
    folder = Path(folder)
    hf_config = config_to_hf(model.config)
    if eot_id is not None:
        hf_config |= {"bos_token_id": eot_id, "eos_token_id": eot_id}
    tensors = gpt2_state_dict_to_hf(model.state_dict())
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        save_file(tensors, Path(tmp) / "model.safetensors", metadata={"format": "pt"})
        (Path(tmp) / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        for name in ("model.safetensors", "config.json"):
            os.replace(Path(tmp) / name, folder / name)
    return folder


def read_weights(path: Path) -> dict[str, Tensor]:
    """Read a `.safetensors` file, or a PyTorch pickle with `weights_only=True`."""
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def infer_config(state_dict: Mapping[str, Tensor]) -> GPTConfig:
    """Read a GPT-2 config off our state dict's shapes (heads: d_model / 64)."""
    vocab_size, d_model = state_dict["tok_emb.weight"].shape
    return GPTConfig(
        vocab_size=vocab_size,
        context_length=state_dict["pos_emb.weight"].shape[0],
        d_model=d_model,
        n_layers=sum(k.endswith("attn.w_qkv.weight") for k in state_dict),
        n_heads=max(1, d_model // 64),
        d_ff=state_dict["blocks.0.mlp.w_up.weight"].shape[0],
        tie_embeddings="lm_head.weight" not in state_dict,
    )


def _require(sd: Mapping[str, Tensor], keys: list[str]) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ValueError(
            f"not a complete GPT-2 state dict: missing {missing}; "
            "check that the file is a GPT2LMHeadModel / GPT2Model checkpoint"
        )
