"""Taylor solvers in gamma: DDIM (first order) and GENIE's second-order step, with d eps / d gamma
from a distilled head (`genie`) or from autodiff (`genie_exact`)."""
from __future__ import annotations

from .. import ops
from .finite import _output, _pair
from .loop import _StepLoop
from .plan import _per_sample


def ddim(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto", net_dtype=None, plan=None):
    """DDIM (Song et al. 2021) = Euler in gamma on d x_bar / d gamma = eps. 1 NFE per step."""
    run = _StepLoop(model, x, ts, schedule, afs, denoise, backend, net_dtype, plan)
    x_bar, x_n = run.x_bar, x
    for n in run.steps():
        eps = run.eps(x_n, n)
        # x_bar_{n+1} = x_bar_n + h eps_n
        x_bar, x_n = ops.ddim_step(x_bar, eps, run.rows[n], backend=backend)
    return run.finish(x_bar, x_n)


def _genie_eval(model, head, solver="genie"):
    """Picks how `genie` (or another solver of HEAD_SOLVERS) gets (eps, d eps/d gamma information)
    from the model, once: returns (evaluate(x, t) -> (eps, out), kind), kind "raw_head" when out is
    the head's raw [h1|h2|h3] (combined inside the fused step op), "deps" when out is d eps/d gamma."""
    if head is not None:
        if not callable(head):
            raise TypeError(f"head must be a callable head(x, t, eps) -> deps, got {type(head).__name__}")

        def with_head(x, t):  # every output checked: a head returning None would make GENIE silently DDIM
            eps = _output(model(x, t), x, "the model")
            return eps, _output(head(x, t, eps), x, "head=")
        return with_head, "deps"
    if callable(getattr(model, "eps_and_head", None)):
        def eps_and_head(x, t):
            eps, head_out = _pair(model.eps_and_head(x, t), "model.eps_and_head")
            return (_output(eps, x, "model.eps_and_head (its eps)"),
                    _output(head_out, x, "model.eps_and_head (its head output [h1|h2|h3])", channels=3))
        return eps_and_head, "raw_head"
    if callable(getattr(model, "eps_and_deps", None)):
        def eps_and_deps(x, t):
            eps, deps = _pair(model.eps_and_deps(x, t), "model.eps_and_deps")
            return _output(eps, x, "model.eps_and_deps (its eps)"), _output(deps, x, "model.eps_and_deps (its deps)")
        return eps_and_deps, "deps"
    raise TypeError(
        f"{solver} needs d eps/d gamma: give a model with eps_and_head(x, t) (a distilled GENIE head) "
        "or eps_and_deps(x, t), or pass head=callable(x, t, eps) -> deps; "
        "for exact derivatives by autodiff use solver 'genie_exact'")


def genie(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto", net_dtype=None, plan=None,
          head=None):
    """GENIE (Dockhorn et al. 2022, eq. 9): second-order truncated Taylor step in gamma,

        x_bar_{n+1} = x_bar_n + h eps_n + h^2 / 2 * (d eps / d gamma)_n,

    with d eps/d gamma from the distilled head: model.eps_and_head (raw [h1|h2|h3], combined in
    the fused op), model.eps_and_deps, or head(x, t, eps) -> deps (t: the model time the network
    received, eps: its output). 1 NFE per step (the paper's accounting: the head counts as part
    of the evaluation).
    """
    evaluate, kind = _genie_eval(model, head)
    run = _StepLoop(model, x, ts, schedule, afs, denoise, backend, net_dtype, plan)
    x_bar, x_n = run.x_bar, x
    for n in run.steps():
        row = run.rows[n]
        if run.afs_step(n):  # eps = x_T, deps = 0: a DDIM step
            x_bar, x_n = ops.ddim_step(x_bar, run.x_T, row, backend=backend)
            continue
        eps, d = run.call(evaluate, x_n, run.plan.t_net[n])
        # x_bar_{n+1} = x_bar_n + h eps_n + h^2/2 deps_n  (deps_n: the head's, or w1 h1 + w2 h2 + w3 h3)
        if kind == "raw_head":
            x_bar, x_n = ops.genie_step(x_bar, eps, d, row, backend=backend)
        else:
            x_bar, x_n = ops.taylor_step(x_bar, eps, d, row, backend=backend)
    return run.finish(x_bar, x_n)


def genie_exact(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto", net_dtype=None, plan=None):
    """GENIE's Taylor step with d eps/d gamma from forward-mode autodiff (the head's teacher).

    1 + JVP_NFE NFE per step: eps and a JVP through the network (`jvp`). With AFS the first step
    (a DDIM step with eps = x_T) costs nothing.
    """
    run = _StepLoop(model, x, ts, schedule, afs, denoise, backend, net_dtype, plan)
    dt_dgamma = run.plan.weights("dt_dgamma", lambda: _per_sample(
        schedule.dt_dgamma(run.plan.gammas[:-1]), run.plan.batch))
    x_bar, x_n = run.x_bar, x
    for n in run.steps():
        row = run.rows[n]
        if run.afs_step(n):
            x_bar, x_n = ops.ddim_step(x_bar, run.x_T, row, backend=backend)
            continue
        eps = run.eps(x_n, n)
        deps = run.exact_deps(x_n, eps, n, dt_dgamma)
        # x_bar_{n+1} = x_bar_n + h eps_n + h^2/2 deps_n  (deps_n by a JVP)
        x_bar, x_n = ops.taylor_step(x_bar, eps, deps, row, backend=backend)
    return run.finish(x_bar, x_n)
