"""docs/chat.md end to end on a tiny random Llama with a chat template this test writes: conversational
JSONL and parquet -> `dpoq train` (full DPO, LoRA DPO) -> `dpoq convert` export -> `dpoq generate` chat
samples -> `dpoq score` token-reward report. (The GGUF step is tests/test_gguf.py.)"""

from __future__ import annotations

import json
import os

import pytest
from helpers import tiny_chat_model

from dpoq_jax.cli import main as dpoq

HERE = os.path.dirname(__file__)
CONFIG = os.path.join(HERE, "..", "experiments", "configs", "chat_dpo.py")
TINY = ["--config.data.max_prompt_tokens=40", "--config.data.response_len=20",
        "--config.train.batch_size=8", "--config.train.num_steps=2", "--config.train.eval_every=0",
        "--config.train.log_every=1", "--config.checkpoint.every_steps=2",
        "--config.train.progress_bar=False", "--config.optim.lr=1e-3", "--config.optim.warmup_steps=0"]


def m(role, content):
    return {"role": role, "content": content}


def _rows(n: int) -> list[dict]:
    colors = ["blue", "green", "red", "gray"]
    rows = []
    for i in range(n):
        q = m("user", f"What color is the sky? ({i})")
        good, bad = m("assistant", f"It is {colors[0]}."), m("assistant", f"It is {colors[1 + i % 3]}.")
        if i % 2:  # implicit prompt, with a system message
            sys_ = m("system", "Be kind.")
            rows.append({"chosen": [sys_, q, good], "rejected": [sys_, q, bad]})
        else:
            rows.append({"prompt": [q], "chosen": [good], "rejected": [bad]})
    return rows


@pytest.mark.slow
def test_bring_your_own_chat_model(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    model = str(tmp_path / "model")
    tiny_chat_model(model)
    rows = _rows(8)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    explicit = [r for r in rows if "prompt" in r]  # a table column is either messages or absent
    pq.write_table(pa.Table.from_pylist(explicit), tmp_path / "prefs.parquet")

    # full DPO on JSONL, LoRA DPO on parquet
    full = str(tmp_path / "run_full")
    assert dpoq(["train", "--config", f"{CONFIG}:{model}", "--workdir", full,
                 f"--config.data.path={prefs}", *TINY]) == 0
    lora = str(tmp_path / "run_lora")
    assert dpoq(["train", "--config", f"{CONFIG}:{model}", "--workdir", lora,
                 "--config.data.source=datasets", f"--config.data.path={tmp_path / 'prefs.parquet'}",
                 "--config.model.lora.rank=4", *TINY]) == 0
    assert os.path.isfile(os.path.join(lora, "hf", "config.json"))  # LoRA runs export merged weights

    # export the full run (its tokenizer, chat template included, goes along)
    export = str(tmp_path / "export")
    assert dpoq(["convert", "--from", full, "--to", export]) == 0
    assert os.path.isfile(os.path.join(export, "chat_template.jinja"))

    # chat samples
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": [m("user", "What color is the sky?")]}) + "\n"
                       + json.dumps({"messages": [m("system", "Be brief."), m("user", "Hi")]}) + "\n")
    samples = tmp_path / "samples.jsonl"
    assert dpoq(["generate", "--model", export, "--prompts", str(prompts), "--max-new-tokens", "6",
                 "--batch-size", "2", "--out", str(samples)]) == 0
    out = [json.loads(x) for x in samples.read_text().splitlines()]
    assert len(out) == 2 and out[0]["prompt"] == [m("user", "What color is the sky?")]
    assert all(o["outputs"][0]["length"] >= 1 for o in out)

    # token-reward report of the trained (LoRA) policy against the start model, on the training pairs:
    # the run folder itself (adapters merged into their base) with the run's own β
    report = tmp_path / "report"
    assert dpoq(["score", "--policy", lora, "--reference", model, "--pairs", str(prefs),
                 "--out-dir", str(report), "--max-png", "1"]) == 0
    scores = json.loads((report / "scores.json").read_text())
    assert scores["beta"] == json.loads(open(os.path.join(lora, "config.json")).read())["loss"]["beta"]
    item = scores["items"][1]  # an implicit-prompt row
    assert item["prompt"].endswith("<|im_start|>assistant\n") and "Be kind." in item["prompt"]
    assert "".join(item["responses"]["chosen"]["tokens"]) == "It is blue.<|im_end|>\n"  # end of turn, no EOS
    assert (report / "report.html").is_file()
