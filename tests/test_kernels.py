"""The Triton kernels (genie_fast.kernels) compile for the GPU we target, without a GPU.

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python, not Triton's compiler, so a
lowering error (an op Triton cannot lower for fp64, a bad annotation) would wait for a GPU.
Here each kernel is compiled ahead of time to sm_90 PTX and cubin (Triton's bundled ptxas) in a
subprocess without the interpreter, for the network dtypes the samplers use.
"""
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import json, re
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile
    from genie_fast.kernels.genie_step import _genie_step_kernel
    from genie_fast.kernels.ddim_step import _ddim_step_kernel
    from genie_fast.kernels.denoise_step import _denoise_step_kernel
    from genie_fast.kernels.dpmpp_2m_step import _dpmpp_2m_step_kernel
    from genie_fast.kernels.genie_multistep_step import _genie_multistep_step_kernel
    from genie_fast.kernels.schedule_table import _schedule_table_kernel

    target = GPUTarget("cuda", 90, 32)
    report, div64 = {}, {}
    for net in ("fp32", "fp16", "bf16"):
        for coef in ("fp64", "fp32"):
            kernels = {
                # per_sample, blocks_per_sample (and multistep's n) as launches pass them below 2**31
                "genie_step": (_genie_step_kernel, ["*fp32", f"*{net}", f"*{net}", f"*{coef}", "i64", "*fp32",
                                                    f"*{net}", "i32", "i32"]),
                "ddim_step": (_ddim_step_kernel, ["*fp32", f"*{net}", f"*{coef}", "i64", "*fp32", f"*{net}", "i64"]),
                "denoise_step": (_denoise_step_kernel, ["*fp32", f"*{net}", f"*{coef}", "i64", "*fp32", "i64"]),
                # weights (dpmpp_2m's [a, b], genie_multistep's row) in the coefficients' dtype (float64 or
                # float32 rows)
                "dpmpp_2m_step": (_dpmpp_2m_step_kernel, ["*fp32", f"*{net}", "*fp32", f"*{coef}", "i64",
                                                          f"*{coef}", "i64", "*fp32", f"*{net}", "*fp32", "i64"]),
                "genie_multistep_step": (_genie_multistep_step_kernel,
                                         ["*fp32", "*fp32", f"*{net}", f"*{net}", "*fp32", "*fp32", f"*{coef}", "i64",
                                          f"*{coef}", "i64", "*fp32", "*fp32", f"*{net}", "*fp32", "*fp32", "i32",
                                          "i32", "i32"]),
            }
            for name, (fn, types) in kernels.items():
                names = list(fn.arg_names)
                sig = dict(zip(names, types + ["constexpr"]))
                k = compile(ASTSource(fn=fn, signature=sig, constexprs={"BLOCK": 1024}), target=target)
                report[f"{name}/{net}/{coef}"] = len(k.asm["cubin"])
                # 64-bit integer divisions (a software routine on the GPU): none per element
                div64[f"{name}/{net}/{coef}"] = len(re.findall(r"\\b(?:div|rem)\\.[su]64\\b", k.asm["ptx"]))
    names = list(_schedule_table_kernel.arg_names)
    sig = dict(zip(names, ["*fp64", "*fp64", "i32", "fp64", "fp64", "constexpr"]))
    k = compile(ASTSource(fn=_schedule_table_kernel, signature=sig, constexprs={"BLOCK": 128}), target=target)
    report["schedule_table"] = len(k.asm["cubin"])
    # the schedule parameters must arrive as f64 (a python float would be specialised to fp32)
    report["schedule_table_f64_params"] = len(re.findall(r"\\.param \\.f64", k.asm["ptx"]))
    print(json.dumps(div64))
    print(json.dumps(report))
''')


def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    import json

    lines = out.stdout.strip().splitlines()
    report, div64 = json.loads(lines[-1]), json.loads(lines[-2])
    assert len(report) == 5 * 3 * 2 + 2
    # the head's sample index of genie_step and genie_multistep_step: one 32-bit division per program
    # (sample_block), not a 64-bit division of every element's offset
    assert len(div64) == 5 * 3 * 2 and not any(div64.values()), div64
    assert all(v > 0 for k, v in report.items() if k != "schedule_table_f64_params")
    assert report["schedule_table_f64_params"] == 2, report
