"""genie_step: the fused GENIE step (head combined at gamma_n, Taylor step) against the eager
PyTorch chain of the same math (genie_step_ref).
What is measured and the options: bench/_step_bench.py.

    python bench/bench_genie_step.py --threads 1
"""
import _step_bench

if __name__ == "__main__":
    _step_bench.main("genie_step", ("state", "net", "head"), __doc__)  # x_bar, eps, head_out
