"""ddim_step: the fused DDIM/AFS step against the eager PyTorch chain of the same math
(ddim_step_ref).
What is measured and the options: bench/_step_bench.py.

    python bench/bench_ddim_step.py --threads 1
"""
import _step_bench

if __name__ == "__main__":
    _step_bench.main("ddim_step", ("state", "net"), __doc__)  # x_bar, eps
