"""TRL worker of benchmarks/peers.py: runs in its own virtualenv (trl==1.16.0, torch==2.13.0 CPU).

    python peers_trl.py WORKDIR check     # TRL's per-pair logps/chosen, logps/rejected and loss
    python peers_trl.py WORKDIR bench     # DPOTrainer.train(), one step per "step" line on stdin

The policy and the reference are loaded separately from WORKDIR/policy and WORKDIR/reference
(AutoModelForCausalLM, float32 on CPU, bfloat16 with batch.json dtype "bfloat16"); no precomputed
reference. The batch goes through TRL's own collator (DataCollatorForPreference: pads to the
longest row of the batch) and its own step (Trainer's loop: training_step + AdamW, constant lr,
no gradient clipping like the dpoq step). The data are token ids (batch.json); the trainer is built
on a one-line text dataset with a word-level tokenizer whose words are the ids ("t17" -> 17), then
given the tokenized pairs, which is what TRL's own tokenization would have produced.
"""

from __future__ import annotations

import pathlib
import resource
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from peers_common import emit, read_batch  # noqa: E402


def tokenizer(vocab_size: int, eos: int, pad: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=f"t{pad}"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{eos}", pad_token=f"t{pad}")


def build(workdir: pathlib.Path, spec: dict, out_dir: str, callbacks=()):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    dtype = torch.bfloat16 if spec.get("dtype") == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(workdir / "policy", dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(workdir / "reference", dtype=dtype)
    P = len(spec["pairs"])
    args = DPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=P,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.01,
        max_grad_norm=0.0,  # no clipping (the dpoq step does not clip either)
        beta=spec["beta"],
        loss_type=["sigmoid"],
        max_length=None,  # no truncation: every row whole
        max_steps=100_000,
        logging_steps=1_000_000,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        bf16=dtype == torch.bfloat16,
        dataloader_num_workers=0,
        seed=0,
    )
    tok = tokenizer(spec["vocab_size"], spec["eos_id"], spec["pad_id"])
    text = Dataset.from_list([{"prompt": "t2", "chosen": " t3", "rejected": " t4"}])
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=text,
                         processing_class=tok, callbacks=list(callbacks))  # fmt: skip
    ids = [{k: p[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for p in spec["pairs"]]
    trainer.train_dataset = Dataset.from_list(ids)
    return trainer, ids


def check(workdir: pathlib.Path, spec: dict) -> dict:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        trainer, ids = build(workdir, spec, tmp)
        model = trainer.model
        model.train()  # TRL's "train" metrics; Llama has no dropout
        dev = trainer.accelerator.device
        chosen, rejected = [], []
        with torch.no_grad():
            for ex in ids:  # one pair per batch: the metric (a batch mean) is that pair's value
                b = {k: v.to(dev) for k, v in trainer.data_collator([ex]).items()}
                trainer.compute_loss(model, b)
                chosen.append(trainer._metrics["train"]["logps/chosen"][-1])
                rejected.append(trainer._metrics["train"]["logps/rejected"][-1])
            b = {k: v.to(dev) for k, v in trainer.data_collator(ids).items()}
            loss = float(trainer.compute_loss(model, b))
        return {"logps_chosen": chosen, "logps_rejected": rejected, "loss": loss,
                "rows": list(b["input_ids"].shape)}  # fmt: skip


def bench(workdir: pathlib.Path, spec: dict) -> None:
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback

    class Gate(TrainerCallback):
        """Each step waits for the parent's "step" line; its time from on_step_begin to on_step_end
        (forward, reference forward, backward, AdamW) goes back as STEP."""

        def __init__(self):
            self.t0 = 0.0
            self.loss = None

        def _wait(self, control):
            for line in sys.stdin:
                cmd = line.strip()
                if cmd == "step":
                    return
                if cmd == "quit":
                    break
            control.should_training_stop = True
            control.should_epoch_stop = True

        def on_train_begin(self, args, state, control, **kw):
            versions = {"trl": trl.__version__, "torch": torch.__version__,
                        "transformers": transformers.__version__}  # fmt: skip
            emit(
                "READY", {"case": "TRL DPOTrainer", "versions": versions, "threads": torch.get_num_threads()}
            )
            self._wait(control)

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            emit("STEP", {"s": time.perf_counter() - self.t0})
            self._wait(control)

    with tempfile.TemporaryDirectory() as tmp:
        trainer, _ = build(workdir, spec, tmp, callbacks=[Gate()])
        trainer.train()
    emit("DONE", {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})


def main(argv: list[str]) -> None:
    workdir, mode = pathlib.Path(argv[0]), argv[1]
    spec = read_batch(workdir)
    if mode == "check":
        emit("CHECK", check(workdir, spec))
    else:
        bench(workdir, spec)


if __name__ == "__main__":
    main(sys.argv[1:])
