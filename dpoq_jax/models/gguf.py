"""GGUF (llama.cpp's single-file format) -> an ordinary Hugging Face folder that every dpoq command takes.

    dpoq convert --from SmolLM2-135M-Instruct.Q4_1.gguf --to smollm2/

transformers reads the file through the `gguf` package (`from_pretrained(folder, gguf_file=name)`),
dequantising every tensor to float32, and its tokenizer comes with the file's chat template. It refuses
to `save_pretrained` the GGUF-marked model, so a model is built from the same config (without the
`quantization_config` the GGUF leaves, which transformers refuses to train on), the loaded weights go
into it (`load_state_dict`) and that one is saved: config.json, model.safetensors (float32), the
tokenizer files with the chat template, generation_config.json. The quantisation's rounding stays in
the weights: the folder computes what the GGUF computes (checked against transformers in
tests/test_gguf.py), not what the unquantised original did.

`gguf` is an optional dependency (extra `chat`): `pip install 'dpoq_jax[chat]'`.
"""

from __future__ import annotations

import os
import struct
from typing import Any, BinaryIO

from dpoq_jax import paths

# GGUF general.architecture -> the config.json model_type it becomes (the families dpoq_jax builds;
# models/model_config.py). transformers' GGUF reader knows more; dpoq's decoder does not.
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "gpt2": "gpt2",
    "gptneox": "gpt_neox",
}
GGUF_PIN = "gguf==0.19.0"

# GGUF metadata value types: id -> struct format (8 = string, 9 = array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize("<" + fmt)
    data = f.read(size)
    if len(data) != size:
        raise EOFError
    return struct.unpack("<" + fmt, data)[0]


def _value(f: BinaryIO, vtype: int) -> Any:
    if vtype in _SCALARS:
        return _read(f, _SCALARS[vtype])
    if vtype == 8:
        return f.read(_read(f, "Q")).decode("utf-8", "replace")
    if vtype == 9:
        item, n = _read(f, "I"), _read(f, "Q")
        return [_value(f, item) for _ in range(n)]
    raise ValueError(f"unknown GGUF value type {vtype}")


def read_architecture(path: str) -> str:
    """`general.architecture` from a GGUF file's header (no tensors read; the gguf package not needed)."""
    try:
        with paths.open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
            _version, _n_tensors, n_kv = _read(f, "I"), _read(f, "Q"), _read(f, "Q")
            for _ in range(n_kv):
                key = f.read(_read(f, "Q")).decode("utf-8", "replace")
                value = _value(f, _read(f, "I"))
                if key == "general.architecture":
                    return str(value)
    except (EOFError, struct.error, MemoryError, OverflowError):
        raise ValueError(f"{path}: truncated or damaged GGUF header") from None
    raise ValueError(f"{path}: GGUF header has no general.architecture")


def check_supported(path: str) -> str:
    """The config.json model_type of a GGUF file's architecture; a one-line error if dpoq cannot run it."""
    arch = read_architecture(path)
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (dpoq_jax converts "
                         f"{', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[arch]


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401, PLC0415
    except ImportError:
        raise ImportError(f"reading a GGUF file needs the gguf package: pip install 'dpoq_jax[chat]' "
                          f"(or pip install {GGUF_PIN})") from None
    try:
        import torch  # noqa: F401, PLC0415
    except ImportError:
        raise ImportError("reading a GGUF file needs torch (transformers dequantises it): "
                          "pip install torch") from None


def load_gguf_torch(src: str) -> tuple[Any, Any]:
    """(transformers' torch model dequantised to float32, tokenizer) read from a GGUF file."""
    _require_gguf()
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    folder, name = os.path.split(os.path.abspath(src))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), tok


def convert_gguf(src: str, dst: str, *, dtype: str = "float32") -> None:
    """Write the model and tokenizer of GGUF file `src` as a Hugging Face folder `dst` (safetensors in
    `dtype`, float32 by default, config.json without quantization_config, tokenizer files with the chat
    template).

    Errors (one line): not a GGUF file, an architecture dpoq_jax has no decoder for, no `gguf` package.
    `src` must be a local file (transformers reads GGUF from local disk); `dst` may be gs://.
    """
    if paths.is_gcs(src):
        raise ValueError(f"--from {src}: a GGUF file must be on local disk (copy it first)")
    if not os.path.isfile(src):
        raise FileNotFoundError(f"--from {src}: no such file")
    check_supported(src)
    _require_gguf()
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    from dpoq_jax.models.model_config import config_from_hf  # noqa: PLC0415

    gguf_model, tok = load_gguf_torch(src)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # transformers refuses to train a model that carries it
    config_from_hf(config.to_dict(), where=src)  # our decoder takes it (or says which key it refuses)
    import torch  # noqa: PLC0415

    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{src}: the GGUF tensors do not fill the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    model = model.to(getattr(torch, dtype))
    local = paths.staging_dir() if paths.is_gcs(dst) else dst
    model.save_pretrained(local)
    tok.save_pretrained(local)
    if local != dst:
        paths.upload_dir(local, dst)
