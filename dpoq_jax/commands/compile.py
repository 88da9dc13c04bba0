"""`dpoq compile --config FILE --topology v5e:2x4`: the train step compiled ahead of time for a TPU
topology on any host (train/aot.py), reported as per-chip memory, fit, FLOPs and compile time."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from dpoq_jax import paths
from dpoq_jax.data.errors import reports_user_errors
from dpoq_jax.train.aot import ALIASES, CompileReport, compile_step, search_batch


def print_report(r: CompileReport) -> None:
    print(f"topology      {r.topology}: {r.chips} x {r.device_kind}, mesh {r.mesh}")
    print(
        f"step          {r.stage} layout={r.layout} attention={r.attention} reference={r.reference} "
        f"layers={r.num_layers}{f' lora_rank={r.lora_rank}' if r.lora_rank else ''} "
        f"batch={r.batch_size} micro_batches={r.micro_batches} seq_len={r.seq_len}"
    )
    print(
        f"per chip      arguments {r.argument_gib:.3f} GiB, outputs {r.output_gib:.3f} GiB "
        f"(aliased {r.alias_gib:.3f}), temporaries {r.temp_gib:.3f} GiB"
    )
    fits = {True: "fits", False: "DOES NOT FIT", None: "unknown chip HBM"}[r.fits]
    print(f"peak          {r.peak_gib:.3f} GiB of {r.hbm_gib} GiB HBM: {fits}")
    xla = r.xla_flops_per_chip
    print(f"flops/step    {r.flops_per_step:.4g} (model FLOPs, all chips; XLA per chip: {xla:.4g})")
    print(f"compile       {r.compile_s:.1f} s")


@reports_user_errors("dpoq compile")
def compile_main(argv: list[str]) -> int:
    """dpoq compile --config FILE[:arg] --topology T [--model-config F] [--json OUT] [--search-batch]"""
    from dpoq_jax.parser import Parser

    p = Parser(
        prog="dpoq compile",
        description="Compile the config's train step ahead of time for a TPU topology (on any host, "
        "nothing allocated) and report per-chip memory, fit, FLOPs and compile time",
    )
    p.add_argument(
        "--config",
        required=True,
        help="FILE[:arg]: a Python file with get_config(arg=None); --config.key=value overrides follow",
    )
    p.add_argument("--topology", required=True, help=f"e.g. v5e:2x4, v4:2x2x1 or one of {sorted(ALIASES)}")
    p.add_argument(
        "--model-config",
        default=None,
        help="config.json of the model shape (None: the config's own model)",
    )
    p.add_argument("--chip-config", default=None, help="libtpu chip config (None: megacore on v4)")
    p.add_argument("--json", default=None, help="also write the report(s) here as JSON (None: print only)")
    p.add_argument(
        "--search-batch",
        action="store_true",
        help="compile with 1, 2, 4, ... examples per batch shard and micro-batch until one does not fit",
    )
    p.add_argument(
        "--max-batch", type=int, default=256, help="--search-batch stops after this per-shard size"
    )
    args, overrides = p.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from dpoq_jax.train.config import ConfigError, load_config

    # the step's shapes come from the data config's layout and lengths; no data file is read
    # (and with --model-config, no model file either)
    placeholders = ["--config.data.path=."] + (["--config.model.path=."] if args.model_config else [])
    overrides = [*placeholders, *overrides]
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    try:
        import libtpu  # noqa: F401
    except ImportError:
        print("dpoq compile: needs libtpu: pip install 'dpoq_jax[tpu]'", file=sys.stderr)
        return 2
    if args.search_batch:
        out: Any = search_batch(cfg, args.topology, args.model_config, args.chip_config, args.max_batch)
    else:
        r = compile_step(cfg, args.topology, args.model_config, args.chip_config)
        print_report(r)
        out = r.to_dict()
    if args.json:
        paths.write_text(args.json, json.dumps(out, indent=1))
    return 0
