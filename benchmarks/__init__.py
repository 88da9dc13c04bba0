"""Speed and memory benchmarks of the DPO step, with the PyTorch/transformers reference step."""
