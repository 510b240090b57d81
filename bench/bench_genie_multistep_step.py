"""genie_multistep_step: the fused genie_multistep update (x0 and its log-SNR derivative from the
head, corrector and predictor over the history slots, next network input) against the eager
PyTorch chain of the same math (genie_multistep_step_ref).
What is measured and the options: bench/_step_bench.py.

    python bench/bench_genie_multistep_step.py --threads 1
"""
import _step_bench
from genie_fast.ops import MULTISTEP_D_SLOTS, MULTISTEP_WEIGHTS, MULTISTEP_X0_SLOTS

if __name__ == "__main__":
    # x_bar, x_bar_eval, eps, head_out, x0_hist, d_hist, weights
    _step_bench.main("genie_multistep_step", ("state", "state", "net", "head", f"slots:{MULTISTEP_X0_SLOTS}",
                                              f"slots:{MULTISTEP_D_SLOTS}", f"weights:{MULTISTEP_WEIGHTS}"), __doc__)
