"""Every name a module exported in its ``__all__`` before the package was reorganised (issue 26)
stays importable from where it was: scripts and notebooks written against the old layout keep
working. Two aliases were removed on purpose: ``engine.ENGINE_SOLVERS`` (use ``solvers.SOLVERS``)
and ``engine.draw_noise`` (use ``make_noise``)."""
from __future__ import annotations

import importlib

import pytest

PUBLIC = {
    "genie_fast": [
        'DiscreteVPSchedule', 'SOLVERS', 'SamplingEngine', 'VPSchedule', 'coeff_table', 'encode', 'nfe_of',
        'sample', 'steps_for_nfe', 'time_grid', 'tune_grid', 'sample_cascade', 'load_cascade'  # issue 32
    ],
    "genie_fast.cascade": [  # issue 32
        'CASCADE_FORMAT', 'Cascade', 'DEFAULT_AUG_LEVEL', 'STAGE_OPTIONS', 'cascade_path', 'load_cascade',
        'sample_cascade', 'save_cascade'
    ],
    "genie_fast.checks": [
        'check_device', 'check_flag', 'check_int', 'check_number', 'check_out_dir', 'check_out_file'
    ],
    "genie_fast.distill_diffusers": ['add_diffusers_args', 'distill_diffusers', 'load_images', 'model_pool'],
    "genie_fast.engine": [
        'DTYPES', 'GraphKey', 'NonFiniteError', 'SamplingEngine', 'engine_for', 'make_noise', 'no_tf32',
        'seed_noise'
    ],
    "genie_fast.generate": [
        'build_parser', 'check_args', 'format_seeds', 'generate', 'main', 'parse_seeds', 'seed_noise',
        'to_uint8', 'weights_hash'
    ],
    "genie_fast.guidance": [
        'Conditioned', 'DEFAULT_GUIDANCE_SCALE', 'check_labels', 'check_scale', 'conditioned', 'wrapper_for'
    ],
    "genie_fast.conditioning": [  # issue 31
        'check_cond', 'check_cond_names', 'check_decode', 'cond_signature', 'null_cond', 'read_cond_file', 'space_of'
    ],
    "genie_fast.models.diffusers_cond": [  # issue 31
        'ADDED_NAMES', 'VAEDecoder', 'cond_names', 'last_resnet', 'unet_kwargs', 'vae_decoder'
    ],
    "genie_fast.models": [
        'CONFIGS', 'GaussianMixture', 'GenieHead', 'GenieModel', 'HeadConfig', 'ModelFileError', 'UNet',
        'UNetConfig', 'from_diffusers', 'load_default', 'load_diffusers', 'load_model', 'save_model'
    ],
    "genie_fast.models.diffusers": [
        'BETA_SCHEDULES', 'DiffusersGenieModel', 'DiffusersSchedule', 'DiffusersUNet', 'HEAD_STEM',
        'PREDICTION_TYPES', 'alphas_cumprod_from_config', 'from_diffusers', 'load_diffusers', 'load_head',
        'save_head', 'scheduler_grid'
    ],
    "genie_fast.models.gmm": ['GaussianMixture'],
    "genie_fast.ops": [
        'BACKENDS', 'MULTISTEP_WEIGHTS', 'available_backends', 'check_backend', 'ddim_step',
        'ddim_step_ref', 'denoise_step', 'denoise_step_ref', 'dpmpp_2m_step', 'dpmpp_2m_step_ref',
        'genie_multistep_step', 'genie_multistep_step_ref', 'genie_step', 'genie_step_ref',
        'head_combine_ref', 'schedule_table', 'taylor_step', 'taylor_step_ref'
    ],
    "genie_fast.profiling": [
        'DOMAIN', 'EMITTERS', 'configure', 'emitter', 'ncu_nvtx_filter', 'nvtx_range', 'pop', 'push'
    ],
    "genie_fast.reference": ['ReferenceSolution', 'reference_solution', 'rk4_solve'],
    "genie_fast.sampling": ['NonFiniteError', 'encode', 'make_noise', 'sample', 'seed_noise'],
    "genie_fast.schedule": [
        'COEFF_COLUMNS', 'DiscreteVPSchedule', 'GRIDS', 'VPSchedule', 'coeff_table', 'ode_tangents',
        'q_sample', 'time_grid'
    ],
    "genie_fast.solvers": [
        'AUTO_AFS', 'AUTO_GRID', 'DEFAULT_AFS', 'DEFAULT_HEAD_ERROR', 'DEFAULT_NFE', 'DEFAULT_SOLVER',
        'HEAD_SOLVERS', 'JVP_NFE', 'NFE_PER_STEP', 'NonFiniteError', 'Plan', 'SOLVERS', 'check_grid',
        'ddim', 'dpm_solver_2', 'dpmpp_2m', 'dpmpp_3m', 'evals_per_call', 'exact_deps', 'find_nonfinite',
        'genie', 'genie_exact', 'genie_multistep', 'grid_for', 'head_weight', 'heun', 'ipndm', 'jvp',
        'nfe_of', 'steps_for_nfe', 'unipc'
    ],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_still_importable(module):
    mod = importlib.import_module(module)
    missing = [n for n in PUBLIC[module] if not hasattr(mod, n)]
    assert not missing, f"{module} lost {missing}"


def test_removed_aliases_are_gone():
    engine = importlib.import_module("genie_fast.engine")
    assert not hasattr(engine, "ENGINE_SOLVERS") and not hasattr(engine, "draw_noise")
