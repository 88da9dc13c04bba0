"""The paper's experiments on the synthetic tasks, one script each.

Run `python -m experiments.<name>`; see the README's Experiments section.
"""
