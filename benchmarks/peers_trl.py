"""TRL worker of benchmarks/peers.py: runs in its own virtualenv (trl==1.16.0, torch==2.13.0 CPU).

    python peers_trl.py WORKDIR check [CASE...]   # TRL's per-pair logps/chosen, logps/rejected and loss
    python peers_trl.py WORKDIR bench CASE        # DPOTrainer.train(), one step per "step" line on stdin

A case is trl[/OPTION...]: options ckpt (gradient_checkpointing=True, TRL 1.16's own DPOConfig
default: the plain "trl" row sets it to False, like for like with a dpoq step without remat) and
precomputed (precompute_ref_log_probs=True: TRL 1.16's DPOTrainer.__init__ runs the reference over
the whole train dataset once, `_precompute_ref_logps`, and adds ref_chosen_logps/ref_rejected_logps
columns; `_compute_loss` then reads them from the batch and runs no reference forward. The
precompute happens before train(), so it is not timed, as for dpoq; the reference model is then
dropped, as TRL does when it is given none).

The policy and the reference are loaded separately from WORKDIR/policy and WORKDIR/reference
(AutoModelForCausalLM, float32; with batch.json dtype "bfloat16", DPOConfig bf16=True: bfloat16
autocast over the float32 weights, like dpoq's bfloat16 compute over float32 parameters). The data are
token ids (batch.json): the trainer is built on a one-line text dataset with a word-level tokenizer
whose words are the ids ("t17" -> 17), then given the tokenized pairs, which is what TRL's own
tokenization would have produced (with precomputed, passed through DPOTrainer._precompute_ref_logps
first, the call its __init__ makes on its train_dataset). Its collator (DataCollatorForPreference:
pads to the longest row of the batch) and its own step (Trainer's loop: training_step + AdamW,
constant lr, no gradient clipping like the dpoq step) do the rest.
"""

from __future__ import annotations

import gc
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from peers_common import case_options, emit, peak_rss_bytes, read_batch  # noqa: E402

OPTIONS = {"ckpt", "precomputed"}


def tokenizer(vocab_size: int, eos: int, pad: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=f"t{pad}"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{eos}", pad_token=f"t{pad}")


def build(workdir: pathlib.Path, spec: dict, out_dir: str, case: str = "trl", callbacks=()):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    opts = case_options(case, "trl", OPTIONS)
    bf16 = spec.get("dtype") == "bfloat16"  # autocast; the weights stay float32 either way
    model = AutoModelForCausalLM.from_pretrained(workdir / "policy", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(workdir / "reference", dtype=torch.float32)
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
        bf16=bf16,
        dataloader_num_workers=0,
        seed=0,
        gradient_checkpointing="ckpt" in opts,  # TRL 1.16's default is True; said explicitly either way
        precompute_ref_log_probs="precomputed" in opts,
        precompute_ref_batch_size=P,
    )
    tok = tokenizer(spec["vocab_size"], spec["eos_id"], spec["pad_id"])
    text = Dataset.from_list([{"prompt": "t2", "chosen": " t3", "rejected": " t4"}])
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=text,
                         processing_class=tok, callbacks=list(callbacks))  # fmt: skip
    ids = Dataset.from_list(
        [{k: p[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for p in spec["pairs"]]
    )
    if "precomputed" in opts:  # what DPOTrainer.__init__ does to its train_dataset with this option
        ids = trainer._precompute_ref_logps(ids, "train", args.precompute_ref_batch_size)
    trainer.train_dataset = ids
    if "precomputed" in opts:  # the reference forward is done: hold no reference while training
        trainer.ref_model = None
        del ref
        gc.collect()
    return trainer


def check(workdir: pathlib.Path, spec: dict, cases: list[str]) -> dict:
    """Per case (ckpt changes no value, so only trl and trl/precomputed are computed): per-pair
    logps/chosen, logps/rejected (one pair per batch: the metric, a batch mean, is that pair's value)
    and the loss of the whole batch."""
    import torch

    out = {}
    for case in cases:
        if "precomputed" not in case_options(case, "trl", OPTIONS):
            case = "trl"
        else:
            case = "trl/precomputed"
        if case in out:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            trainer = build(workdir, spec, tmp, case)
            model = trainer.model
            model.train()  # TRL's "train" metrics; Llama has no dropout
            dev = trainer.accelerator.device
            rows = [dict(r) for r in trainer.train_dataset]
            chosen, rejected = [], []
            with torch.no_grad():
                for ex in rows:
                    b = {k: v.to(dev) for k, v in trainer.data_collator([ex]).items()}
                    trainer.compute_loss(model, b)
                    chosen.append(trainer._metrics["train"]["logps/chosen"][-1])
                    rejected.append(trainer._metrics["train"]["logps/rejected"][-1])
                b = {k: v.to(dev) for k, v in trainer.data_collator(rows).items()}
                loss = float(trainer.compute_loss(model, b))
            out[case] = {"logps_chosen": chosen, "logps_rejected": rejected, "loss": loss,
                         "rows": list(b["input_ids"].shape)}  # fmt: skip
    return out


def label(case: str) -> str:
    opts = case_options(case, "trl", OPTIONS)
    return ", ".join(["TRL DPOTrainer"] + ["gradient checkpointing"] * ("ckpt" in opts)
                     + ["precomputed reference"] * ("precomputed" in opts))  # fmt: skip


def bench(workdir: pathlib.Path, spec: dict, case: str) -> None:
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback

    class Gate(TrainerCallback):
        """Each step waits for the parent's "step" line; its time from on_step_begin to on_step_end
        (forward, reference forward unless precomputed, backward, AdamW) goes back as STEP."""

        def __init__(self):
            self.t0 = 0.0

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
            emit("READY", {"case": label(case), "versions": versions, "threads": torch.get_num_threads(),
                           "gradient_checkpointing": bool(args.gradient_checkpointing),
                           "precompute_ref_log_probs": bool(args.precompute_ref_log_probs)})  # fmt: skip
            self._wait(control)

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():  # the step's kernels, not only their launch
                torch.cuda.synchronize()
            emit("STEP", {"s": time.perf_counter() - self.t0})
            self._wait(control)

    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(workdir, spec, tmp, case, callbacks=[Gate()])
        trainer.train()
    emit("DONE", {"peak_rss_bytes": peak_rss_bytes()})


def main(argv: list[str]) -> None:
    workdir, mode = pathlib.Path(argv[0]), argv[1]
    spec = read_batch(workdir)
    if mode == "check":
        emit("CHECK", check(workdir, spec, argv[2:] or ["trl"]))
    else:
        bench(workdir, spec, argv[2] if len(argv) > 2 else "trl")


if __name__ == "__main__":
    main(sys.argv[1:])
