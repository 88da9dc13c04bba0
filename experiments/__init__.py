"""The paper's experiments on the synthetic tasks, one script each.

Run `python -m experiments.<name>`; see docs/experiments.md.
"""
