"""Write tests/fixtures/trl_losses.json: TRL's own DPOTrainer loss and metrics for every loss type.

Run in a TRL virtualenv (not the project's environment):
    python3 -m venv /work/venvs/trl && /work/venvs/trl/bin/pip install torch==2.13.0 trl==1.16.0
    /work/venvs/trl/bin/python benchmarks/trl_loss_fixture.py

A tiny random Llama is the policy; the reference is a DIFFERENT model (the same weights plus noise), so
no pairwise loss degenerates to a constant. For each case a fresh DPOTrainer is built with that case's
DPOConfig and its `_compute_loss` (the function `compute_loss` calls) runs on one fixed batch made by
the trainer's own collator. The fixture holds the per-token log-probs of policy and reference on the
completion tokens ([P, R], left-aligned, 0-padded), TRL's `log_sum_sq_probs` (WPO) of the policy, the
masks, and TRL's loss and metrics, so the project's test needs no torch.
"""

from __future__ import annotations

import copy
import json
import pathlib
import tempfile

import torch
import transformers
import trl
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from trl import DPOConfig, DPOTrainer

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "trl_losses.json"
V = 64
BETA = 0.5
# (prompt, chosen, rejected) token ids; unequal response lengths exercise ld_alpha and the averages.
PAIRS = [
    ([5, 6, 7], [10, 11, 12, 13, 2], [20, 21, 2]),
    ([8, 9], [30, 31, 2], [40, 41, 42, 43, 44, 2]),
    ([12, 13, 14, 15], [50, 2], [51, 52, 2]),
    ([3, 4], [60, 61, 62, 2], [33, 34, 35, 36, 2]),
]

CASES: list[dict] = [
    {"loss_type": [t]}
    for t in (
        "sigmoid",
        "hinge",
        "ipo",
        "nca_pair",
        "robust",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "discopop",
        "sft",
        "sigmoid_norm",
    )
] + [
    {"loss_type": ["exo_pair"], "label_smoothing": 1e-3},
    {"loss_type": ["robust"], "label_smoothing": 0.2},
    {"loss_type": ["aot"], "label_smoothing": 0.1},
    {"loss_type": ["aot_unpaired"], "label_smoothing": 0.1},
    {"loss_type": ["discopop"], "discopop_tau": 0.3},
    # the MPO recipe: a weighted mixture
    {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    {"loss_type": ["sigmoid_norm", "hinge"], "loss_weights": [0.5, 2.0]},
    {"loss_type": ["sigmoid"], "ld_alpha": 0.5},
    {"loss_type": ["sigmoid"], "ld_alpha": 0.0},
    {"loss_type": ["ipo"], "ld_alpha": 0.3},
    {"loss_type": ["sigmoid_norm"], "ld_alpha": 0.7},
    {"loss_type": ["sigmoid"], "use_weighting": True},
    {"loss_type": ["bco_pair"], "use_weighting": True},
    {"loss_type": ["sigmoid", "sppo_hard"], "loss_weights": [1.0, 0.5], "use_weighting": True},
    {"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl"},
    {"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"},
    {"loss_type": ["sigmoid"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5},
    {"loss_type": ["hinge"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    {"loss_type": ["sigmoid_norm"], "f_divergence_type": "js_divergence"},
    {"loss_type": ["ipo"], "f_divergence_type": "forward_kl"},
    {"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl", "ld_alpha": 0.5, "use_weighting": True},
]
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(V)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="t0", eos_token="t2", unk_token="t1"
    )


def models_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    policy = transformers.LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # sharper than the default init, so log-probs differ from -log V
        policy.lm_head.weight.mul_(40.0)
    ref = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
    return policy, ref


def completion_rows(x_NL: torch.Tensor, mask_NL: torch.Tensor, R: int) -> list[list[float]]:
    """The completion positions of each row, left-aligned and 0-padded to R."""
    out = []
    for x, m in zip(x_NL, mask_NL, strict=True):
        vals = x[m.bool()].tolist()
        out.append(vals + [0.0] * (R - len(vals)))
    return out


def main() -> None:
    policy0, ref0 = models_pair()
    examples = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in PAIRS]
    # The trainer wants a text dataset to build; the loss runs on `examples` through its collator.
    text = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731
    dataset = Dataset.from_list(
        [{"prompt": text(p), "chosen": text(c), "rejected": text(r)} for p, c, r in PAIRS]
    )
    P = len(PAIRS)
    R = max(max(len(c), len(r)) for _, c, r in PAIRS)
    cases_out = []
    arrays = None
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            args = DPOConfig(
                output_dir=tmp, beta=BETA, report_to=[], per_device_train_batch_size=P, use_cpu=True,
                save_strategy="no", logging_strategy="no", max_length=None, **case,
            )  # fmt: skip
            policy, ref = copy.deepcopy(policy0), copy.deepcopy(ref0)
            trainer = DPOTrainer(policy, ref, args=args, train_dataset=dataset, processing_class=tokenizer())
            inputs = trainer.data_collator(examples)
            trainer.model.train()
            loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
            got = {k: v[-1] for k, v in trainer._metrics["train"].items() if k in METRICS}
            cases_out.append({"config": case, "loss": float(loss), "metrics": got})
            print(case, float(loss))
            if arrays is None and case.get("use_weighting"):  # its forward also gives log Σ p²
                arrays = fixture_arrays(trainer, inputs, P, R)
    payload = {
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "beta": BETA,
        "pairs": [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS],
        **arrays,
        "cases": cases_out,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {OUT} ({len(cases_out)} cases, trl {trl.__version__})")


def fixture_arrays(trainer: DPOTrainer, inputs: dict, P: int, R: int) -> dict:
    """Per-token log-probs of policy and reference on the completion tokens, through the same patched
    (fused LM head) forwards TRL's loss uses, and the policy's log Σ_v p_v² (WPO)."""
    shift_mask = inputs["completion_mask"][:, 1:]
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    kw = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "use_cache": False}
    with torch.no_grad():
        out = trainer.model(**kw, labels=labels, fused_lm_head=True)
        ref_out = trainer.ref_model(**kw, labels=labels, fused_lm_head=True)
    L = shift_mask.shape[1]
    lp, ref_lp, lsq = out.log_probs[:, -L:], ref_out.log_probs[:, -L:], out.log_sum_sq_probs[:, -L:]
    cols = {}
    for name, x in (("policy", lp), ("ref", ref_lp), ("policy_log_sum_sq_probs", lsq)):
        rows = completion_rows(x.float(), shift_mask, R)
        cols[f"{name}_chosen_PR"], cols[f"{name}_rejected_PR"] = rows[:P], rows[P:]
    m = completion_rows(shift_mask.float(), shift_mask, R)
    cols["chosen_mask_PR"], cols["rejected_mask_PR"] = m[:P], m[P:]
    return cols


if __name__ == "__main__":
    main()
