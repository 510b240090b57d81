"""Memory layouts the fused ops share: the per-step solver weight vectors a step op reads beside its
coefficient row (one row of `schedule.coeff_table`, whose columns stay in `schedule.COEFF_COLUMNS`),
and genie_multistep's history slots. A base-layer module, so the reference ops (genie_fast.ops), the
Triton kernels (genie_fast.kernels) and the solvers read one definition; the C++ and CUDA kernels
keep a copy in csrc/step_formulas.h (keep them in sync).
"""
from __future__ import annotations

__all__ = [
    "MULTISTEP_X0_SLOTS", "MULTISTEP_D_SLOTS", "MULTISTEP_TERMS", "MULTISTEP_WEIGHTS",
    "DPMPP_2M_A", "DPMPP_2M_B", "DPMPP_2M_WEIGHTS",
]

# genie_multistep_step: x0_hist holds MULTISTEP_X0_SLOTS earlier data predictions, d_hist
# MULTISTEP_D_SLOTS earlier derivatives; one step's weight row weighs the terms
# [base, x0, d, X0..X2, D0..D1] twice (corrector, then predictor), then the next input's scale.
MULTISTEP_X0_SLOTS, MULTISTEP_D_SLOTS = 3, 2
MULTISTEP_TERMS = 3 + MULTISTEP_X0_SLOTS + MULTISTEP_D_SLOTS  # [base, x0, d, X0..X2, D0..D1]
MULTISTEP_WEIGHTS = 2 * MULTISTEP_TERMS + 1                      # corrector, predictor, inv_scale

# dpmpp_2m_step: x_bar_next = r x_bar + (1 - r) (a x0_n + b x0_{n-1}), r from the coefficient row
# (column dpm_r, a schedule quantity); the step's weights are [a, b], from consecutive log-SNR step
# sizes (solvers.multistep._dpmpp_2m_weights).
DPMPP_2M_A, DPMPP_2M_B = 0, 1
DPMPP_2M_WEIGHTS = 2
