"""Triton kernels of genie_fast's fused ops, one module per op (`kernels/<op>.py`, installed as
`genie_fast.kernels`): `_<op>_kernel` and its launcher `<op>(...)`, which writes into the outputs
it is given (the step ops; genie_fast.ops allocates them for its functional API).

Import this package only through `genie_fast.ops` (which imports it lazily): under
`TRITON_INTERPRET=1` (CPU tests) the variable must be set before the kernels are defined.
"""
from .ddim_step import ddim_step
from .denoise_step import denoise_step
from .dpmpp_2m_step import dpmpp_2m_step
from .genie_multistep_step import genie_multistep_step
from .genie_step import genie_step
from .schedule_table import schedule_table

__all__ = ["genie_step", "ddim_step", "denoise_step", "dpmpp_2m_step", "genie_multistep_step", "schedule_table"]
