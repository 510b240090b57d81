"""denoise_step: the fused final denoising step against the eager chain (denoise_step_ref).
What is measured and the options: bench/_step_bench.py.

    python bench/bench_denoise_step.py --threads 1
"""
import _step_bench

if __name__ == "__main__":
    _step_bench.main("denoise_step", ("state", "net"), __doc__)  # x_bar, eps
