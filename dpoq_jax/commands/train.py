"""`dpoq train`, `dpoq precompute-ref` and `dpoq token-rewards`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dpoq_jax import paths
from dpoq_jax.data.errors import reports_user_errors

USAGE_CONFIG = "FILE[:arg]: a Python file with get_config(arg=None); --config.key=value overrides follow"


def _parser(prog: str, description: str, workdir: bool = True) -> argparse.ArgumentParser:
    from dpoq_jax.parser import Parser

    p = Parser(prog=prog, description=description)
    p.add_argument("--config", required=True, help=USAGE_CONFIG)
    if workdir:
        p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, tb/ and hf/ go here")
    g = p.add_argument_group("multi-process (jax.distributed); automatic on Cloud TPU VMs")
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (None: one process)")
    g.add_argument("--num-processes", type=int, default=None, help="processes in all (with --coordinator)")
    g.add_argument("--process-id", type=int, default=None, help="this process, 0-based (with --coordinator)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def init_distributed(
    coordinator: str | None, num_processes: int | None, process_id: int | None, peer_timeout_s: float = 100
) -> None:
    """jax.distributed: explicit flags (CPU/GPU clusters), or auto-detected on a Cloud TPU VM; a lost
    process ends the others within about peer_timeout_s, with one line (train/faults.py)."""
    import jax

    from dpoq_jax.train import faults

    if coordinator is not None:
        if num_processes is None or process_id is None:
            raise SystemExit("--coordinator needs --num-processes and --process-id")
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU all-reduce across processes
        faults.initialize_distributed(peer_timeout_s, coordinator_address=coordinator,
                                      num_processes=num_processes, process_id=process_id)
    elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID"):
        faults.initialize_distributed(peer_timeout_s)


def _logging(verbose: bool) -> None:
    """Our INFO lines; other libraries (orbax, absl) only from WARNING unless --verbose."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    logging.getLogger("dpoq_jax").setLevel(logging.DEBUG if verbose else logging.INFO)


def _load(args: argparse.Namespace, overrides: list[str]):
    """The validated config; a bad one is a usage error: one line and exit status 2 (like argparse)."""
    from dpoq_jax.train.config import ConfigError, load_config

    try:
        return load_config(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


@reports_user_errors("dpoq train")
def train_main(argv: list[str]) -> int:
    """dpoq train --config FILE[:arg] --workdir DIR [--config.key=value ...]"""
    p = _parser(
        "dpoq train", "SFT or DPO training (the config's `stage`); resumes from WORKDIR if it has checkpoints"
    )
    args, overrides = p.parse_known_args(argv)
    _logging(args.verbose)
    cfg = _load(args, overrides)
    init_distributed(args.coordinator, args.num_processes, args.process_id, cfg.train.peer_timeout_s)
    from dpoq_jax.train import faults
    from dpoq_jax.train.loop import NonFiniteError, train

    watch = _peer_watch(cfg.train.peer_timeout_s)
    try:
        last = train(cfg, args.workdir).metrics
    except NonFiniteError as e:
        print(f"dpoq train: {e}", file=sys.stderr)
        return 1
    except faults.Preempted as e:
        print(f"dpoq train: {e}", file=sys.stderr)
        return faults.EXIT_PREEMPTED
    except faults.WriteFailed as e:
        print(f"dpoq train: {e}", file=sys.stderr)
        return faults.EXIT_WRITE_FAILED
    except Exception as e:
        line = watch.explain(e) if watch is not None else None
        if line is not None:  # a collective failed because a peer is gone: one line, no shutdown wait
            faults.exit_now(line)
        raise
    finally:
        if watch is not None:
            watch.stop()
    keys = ("loss", "rewards/accuracies", "rewards/margins", "eval/loss", "eval/rewards/accuracies")
    shown = {k: round(last[k], 4) for k in keys if isinstance(last.get(k), float)}
    print(f"done: {args.workdir} {shown}")
    return 0


def _peer_watch(timeout_s: float):
    """faults.PeerWatch in a multi-process run (None in one process)."""
    import jax

    if jax.process_count() == 1:
        return None
    from dpoq_jax.train import faults

    return faults.PeerWatch(timeout_s).start()


DTYPE_HELP = "stored dtype of the values: float32, or bfloat16 (half the disk, ~3 significant digits)"


@reports_user_errors("dpoq precompute-ref")
def precompute_ref_main(argv: list[str]) -> int:
    """dpoq precompute-ref --config FILE[:arg] --workdir DIR [--output DIR] [--config.key=value ...]"""
    p = _parser(
        "dpoq precompute-ref",
        "Reference log-probs of every train and held-out pair (the config's initial model), written as a "
        "token cache (docs/data.md) for reference.mode='precomputed'",
    )
    p.add_argument("--output", default=None, help="output cache folder (None: WORKDIR/ref_cache)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help=DTYPE_HELP)
    args, overrides = p.parse_known_args(argv)
    _logging(args.verbose)
    cfg = _load(args, overrides + ["--config.stage=dpo", "--config.reference.mode=frozen"])
    init_distributed(args.coordinator, args.num_processes, args.process_id)
    from dpoq_jax.train.precompute import precompute_reference

    out = args.output or paths.join(args.workdir, "ref_cache")
    n = precompute_reference(cfg, out, args.dtype)
    print(
        f"wrote reference log-probs of {n} pairs to {out}; train with --config.reference.mode=precomputed "
        f"--config.reference.logps_path={out}"
    )
    return 0


@reports_user_errors("dpoq token-rewards")
def token_rewards_main(argv: list[str]) -> int:
    """dpoq token-rewards --config FILE[:arg] --policy P --reference R --out DIR [--pairs FILE] [--beta B]"""
    p = _parser(
        "dpoq token-rewards",
        "An oracle's per-token rewards β·(log π − log π_ref) of every train and held-out pair of a config's "
        "data, written as a token cache (docs/data.md) for loss_type token_weighted / selective "
        "(--config.loss.token_weights=DIR)",
        workdir=False,
    )
    p.add_argument("--policy", required=True, help="the oracle policy: HF folder, run workdir or checkpoint")
    p.add_argument("--reference", required=True, help="the oracle's reference (same architecture)")
    p.add_argument("--out", required=True, help="output cache folder (local or gs://)")
    p.add_argument("--pairs", default=None, help="the pairs file (None: the config's data.path)")
    p.add_argument("--beta", type=float, default=1.0, help="β of the rewards (1: the log-ratio)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help=DTYPE_HELP)
    args, overrides = p.parse_known_args(argv)
    _logging(args.verbose)
    fixed = ["--config.stage=dpo", "--config.reference.mode=frozen", "--config.loss.loss_type=sigmoid",
             "--config.loss.token_weights="]  # fmt: skip
    pairs = [f"--config.data.path={args.pairs}"] if args.pairs else []
    cfg = _load(args, overrides + pairs + fixed)
    init_distributed(args.coordinator, args.num_processes, args.process_id)
    from dpoq_jax.train.precompute import token_rewards

    n = token_rewards(cfg, args.policy, args.reference, args.out, args.beta, args.dtype)
    print(f"wrote token rewards of {n} pairs to {args.out}; train with --config.loss.loss_type="
          f"token_weighted (or selective) --config.loss.token_weights={args.out}")
    return 0
