"""dpmpp_2m_step: the fused DPM-Solver++(2M) update against the eager chain (dpmpp_2m_step_ref).
What is measured and the options: bench/_step_bench.py.

    python bench/bench_dpmpp_2m_step.py --threads 1
"""
import _step_bench

if __name__ == "__main__":
    _step_bench.main("dpmpp_2m_step", ("state", "net", "state", "weights:2"), __doc__)  # x_bar, eps, x0_prev, [a, b]
