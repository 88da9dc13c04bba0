"""The PyTorch/transformers DPO step as users write it: the baseline of the benchmark.

GPTNeoXForCausalLM (random init at a Pythia shape, SDPA attention), bfloat16 parameters on GPU
(float32 on CPU), AdamW (fused on CUDA), chosen and rejected rows concatenated into one policy
forward, one no-grad forward of a frozen reference copy, float32 log-softmax + gather, the sigmoid
DPO loss, backward, optimizer step. torch is optional: `run` returns {"skipped": reason} without it.
"""

from __future__ import annotations

import resource
import time
from typing import Any

import numpy as np

from benchmarks import shapes


def padded_rows(pairs, row_len: int) -> dict[str, np.ndarray]:
    """TRL-style concatenated batch: rows 0..P-1 are prompt+chosen, rows P..2P-1 prompt+rejected,
    right-padded to `row_len`. `loss_mask` is 1 on response tokens (EOS included)."""
    num_rows = 2 * len(pairs)
    input_ids = np.zeros((num_rows, row_len), np.int64)
    attention_mask = np.zeros((num_rows, row_len), np.int64)
    loss_mask = np.zeros((num_rows, row_len), np.float32)
    responses = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [
        (p.prompt_ids, p.rejected_ids) for p in pairs
    ]
    for i, (prompt, response) in enumerate(responses):
        n = len(prompt) + len(response)
        if n > row_len:
            raise ValueError(
                f"benchmarks/torch_reference.py: pair row {i} has {n} tokens > row_len={row_len}"
            )
        input_ids[i, :n] = np.concatenate([prompt, response])
        attention_mask[i, :n] = 1
        loss_mask[i, len(prompt) : n] = 1.0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def dpo_loss(policy, reference, batch: dict, beta: float):
    """Sigmoid DPO loss of a concatenated batch (dict of torch tensors), as TRL computes it.
    Returns (loss, per-response policy log-prob sums [2P])."""
    import torch
    import torch.nn.functional as F

    def response_logps(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # Log-softmax in float32: bf16 log-probs lose the differences DPO is made of.
        logps = logits[:, :-1].float().log_softmax(-1)
        logps = logps.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        return (logps * batch["loss_mask"][:, 1:]).sum(-1)

    policy_logps = response_logps(policy)
    with torch.no_grad():
        ref_logps = response_logps(reference)
    p = policy_logps.shape[0] // 2
    margin = (policy_logps[:p] - ref_logps[:p]) - (policy_logps[p:] - ref_logps[p:])
    return -F.logsigmoid(beta * margin).mean(), policy_logps


def run(
    shape: str,
    pairs,
    *,
    row_len: int = 512,
    steps: int = 3,
    warmup: int = 1,
    beta: float = 0.1,
    lr: float = 1e-6,
    seed: int = 0,
) -> dict[str, Any]:
    """Time the reference step on `pairs`; returns seconds per step and peak memory."""
    try:
        import torch
        from transformers import GPTNeoXForCausalLM
    except ImportError as e:  # torch is optional
        msg = f"torch reference skipped: {e}"
        print(msg)
        return {"skipped": msg}
    import copy

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(seed)
    with device:  # initialise on the device: no host copy of a 2.8B model
        policy = GPTNeoXForCausalLM._from_config(
            shapes.torch_config(shape), attn_implementation="sdpa", dtype=dtype
        )
    policy.train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, fused=cuda)
    batch = {k: torch.from_numpy(v).to(device) for k, v in padded_rows(pairs, row_len).items()}

    def step():
        loss, _ = dpo_loss(policy, reference, batch, beta)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    out = {
        "framework": f"torch {torch.__version__}",
        "attn_implementation": policy.config._attn_implementation,
        "param_dtype": str(dtype).removeprefix("torch."),
        "rows": 2 * len(pairs),
        "row_len": row_len,
        "warmup_s": warmup_s,
        "step_times_s": times,
        "step_s": float(np.min(times)),  # fastest step, as for the JAX cases
        "step_median_s": float(np.median(times)),
        "loss": float(loss.detach().float()),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if cuda:
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated())
        out["device"] = torch.cuda.get_device_name()
    return out
