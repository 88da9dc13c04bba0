"""The paper's experiments on the synthetic tasks, as library code (used by `dpoq demo` too).

Each module has `run(args, scale) -> analysis.document.Report` (train or reuse runs, measure, build
the report, with a verdict computed from the numbers) and `main(argv, scales, results_dir)`. The
repository's experiments/<name>.py scripts are thin: their scales, their results folder, one call.
"""
