"""`dpoq convert --from SRC --to DST`: Hugging Face directory <-> params-only orbax checkpoint.

The direction follows the source (read by dpoq_jax.train.load): a `dpoq train` run folder (it has
checkpoints/; a LoRA run's adapters are merged into their base), a checkpoints directory, a step or
save_params' layout is exported to a Hugging Face directory; a Hugging Face directory (config.json +
*.safetensors, a run's own hf/ export included) is imported to an orbax checkpoint; a GGUF file
(*.gguf, llama.cpp's format) becomes a Hugging Face directory (models/gguf.py; needs the `chat`
extra). The tokenizer goes along: --tokenizer when given, else the source's own tokenizer files, else
(export of a run) the tokenizer the run trained with, the synthetic one included.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from dpoq_jax import paths
from dpoq_jax.data.errors import reports_user_errors
from dpoq_jax.parser import Parser


def _write_tokenizer(tok: Any, dst: str) -> list[str]:
    """Copy a directory's tokenizer files, or save the synthetic tokenizer as one; the names written."""
    from dpoq_jax.models.hf import TOKENIZER_FILES  # noqa: PLC0415

    if tok is None:
        return []
    if tok == "synthetic":
        from dpoq_jax.data.synthetic import SyntheticTokenizer  # noqa: PLC0415

        local = paths.staging_dir() if paths.is_gcs(dst) else dst  # it writes local files
        names = SyntheticTokenizer().save_pretrained(local)
        if local != dst:
            paths.upload_dir(local, dst)
        return names
    copied = []
    for name in TOKENIZER_FILES:
        f = paths.join(tok, name)
        if paths.isfile(f):
            paths.copy_file(f, paths.join(dst, name))
            copied.append(name)
    return copied


def _parser() -> argparse.ArgumentParser:
    ap = Parser(prog="dpoq convert", description=__doc__)
    ap.add_argument(
        "--from",
        dest="src",
        required=True,
        help="a `dpoq train` run folder, its checkpoints/ directory, a save_params directory, a "
        "Hugging Face directory (config.json + *.safetensors), or a .gguf file (-> Hugging Face directory)",
    )
    ap.add_argument("--to", dest="dst", required=True, help="output directory (created; not the source)")
    ap.add_argument(
        "--step", type=int, default=None, help="training checkpoint step to export (None: the latest)"
    )
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="storage dtype of the written parameters",
    )
    ap.add_argument(
        "--tokenizer",
        default=None,
        help="'synthetic' or a directory to copy tokenizer files from (None: the source's own, or the "
        "tokenizer the run trained with)",
    )
    return ap


@reports_user_errors("dpoq convert")
def convert_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    same = (paths.absolute(args.src) == paths.absolute(args.dst) if paths.is_gcs(args.src)
            else os.path.realpath(args.src) == os.path.realpath(args.dst))
    if same:
        raise ValueError(f"--from and --to are the same directory ({args.src}); choose a new --to")
    if args.src.lower().endswith(".gguf"):
        return _convert_gguf(args)
    if not paths.isdir(args.src):
        raise FileNotFoundError(f"--from {args.src}: not a directory")
    if args.tokenizer not in (None, "synthetic"):
        from dpoq_jax.models.hf import check_tokenizer  # noqa: PLC0415

        check_tokenizer(args.tokenizer, "--tokenizer")

    import jax.numpy as jnp  # noqa: PLC0415 (keep `--help` fast)

    from dpoq_jax.models import hf, params_io  # noqa: PLC0415
    from dpoq_jax.train.load import load_model, locate  # noqa: PLC0415

    dtype = jnp.dtype(args.dtype)
    files = locate(args.src, step=args.step, flag="--from")
    model = load_model(files, param_dtype=dtype, flag="--from")
    cfg = model.cfg
    if files.kind == "hf":
        params_io.save_params(args.dst, model, cfg)
        kind = "Hugging Face -> orbax"
    else:  # a params checkpoint or a run (a LoRA run's adapters merged into their base)
        hf.save_hf(model, cfg, args.dst)
        kind = "orbax -> Hugging Face"
    tok = args.tokenizer or hf.find_tokenizer(args.src)
    copied = _write_tokenizer(tok, args.dst)
    print(
        f"{kind}: {cfg.family}, {cfg.num_layers} layers, width {cfg.hidden_size} -> {args.dst}"
        + (f" (tokenizer: {', '.join(copied)})" if copied else " (no tokenizer)")
    )
    return 0


def _convert_gguf(args: argparse.Namespace) -> int:
    from dpoq_jax.models import gguf  # noqa: PLC0415

    for flag, value in (("--step", args.step), ("--tokenizer", args.tokenizer)):
        if value is not None:
            raise ValueError(f"{flag}: not used with a GGUF --from (the file holds its model and tokenizer)")
    try:
        gguf.convert_gguf(args.src, args.dst, dtype=args.dtype)
    except ImportError as e:  # the gguf package is missing: one line, not a traceback
        raise SystemExit(f"dpoq convert: error: {e}") from None
    print(f"GGUF -> Hugging Face: {args.src} -> {args.dst} ({args.dtype}; tokenizer with its chat template)")
    return 0
