"""`dpoq convert --from SRC --to DST`: Hugging Face directory <-> params-only orbax checkpoint.

The direction follows the source: a directory with config.json + *.safetensors is imported to an
orbax checkpoint; anything else (save_params' layout, a training checkpoints directory or workdir) is
exported to a Hugging Face directory. Tokenizer files travel along when the source has them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import jax.numpy as jnp


def _copy_tokenizer(src: str | None, dst: str) -> list[str]:
    from dpoq_jax.models.hf import TOKENIZER_FILES  # noqa: PLC0415

    if not src:
        return []
    copied = []
    for name in TOKENIZER_FILES:
        f = os.path.join(src, name)
        if os.path.isfile(f):
            shutil.copy2(f, os.path.join(dst, name))
            copied.append(name)
    return copied


def convert_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="dpoq convert", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--from", dest="src", required=True, help="HF directory or orbax checkpoint / train workdir"
    )
    ap.add_argument("--to", dest="dst", required=True, help="output directory")
    ap.add_argument("--step", type=int, default=None, help="training checkpoint step (default: latest)")
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="storage dtype of the written parameters",
    )
    ap.add_argument("--tokenizer", default=None, help="directory to copy tokenizer files from")
    args = ap.parse_args(argv)

    from dpoq_jax.models import checkpoint, hf  # noqa: PLC0415 (keep `--help` fast)

    dtype = jnp.dtype(args.dtype)
    if os.path.realpath(args.src) == os.path.realpath(args.dst):
        print(f"dpoq convert: --from and --to are the same directory ({args.src}); choose a new --to",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        if os.path.isfile(os.path.join(args.src, "config.json")):
            model, cfg = hf.load_hf(args.src, param_dtype=dtype)
            checkpoint.save_params(args.dst, model, cfg)
            kind = "Hugging Face -> orbax"
        else:
            model, cfg = checkpoint.load_params(args.src, step=args.step, param_dtype=dtype)
            hf.save_hf(model, cfg, args.dst)
            kind = "orbax -> Hugging Face"
        copied = _copy_tokenizer(args.tokenizer or args.src, args.dst)
    except (OSError, KeyError, ValueError) as e:  # OSError: missing, unreadable or unwritable files
        print(f"dpoq convert: {e}", file=sys.stderr)
        return 2
    print(
        f"{kind}: {cfg.family}, {cfg.num_layers} layers, width {cfg.hidden_size} -> {args.dst}"
        + (f" (tokenizer: {', '.join(copied)})" if copied else "")
    )
    return 0
