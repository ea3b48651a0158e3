"""The paper's own toy (arXiv 2603.25562 §3.1 / App. C; ../shared/paper.md §3): future-reward coupling in
alternating-task on-policy distillation of a Gaussian MLP policy on two mirrored 1-D control tasks.

Everything is one traceable function (style.md E6): `make_study(cfg)` returns
`study(seed_keys_S, gammas_G)`, a `jit(vmap_seed(train teachers; vmap_gamma(distill; evaluate)))`.
Teachers are trained once per seed and shared by every γ of that seed; the student's initial parameters
and every rollout key are also shared across γ (common random numbers), so γ is the only thing that
differs between the runs of one seed.

Letters in names: S seeds, G gammas, K tasks (2), I iterations, N trajectories, M micro-batches,
T horizon, P parameters, H hidden width, X heatmap position bins.

Environment (paper.md §3): s_{t+1} = s_t + a_t, a_t ~ N(µ_θ(x_t), σ_θ(x_t)) with
x_t = (task id, s_t / position_scale, t / T). Task 0 ("left") starts at +start and targets −target;
task 1 ("right") starts at −start and targets +target (defaults ±2 → ∓3). The task-id input is −1 for
left and +1 for right.

Choices the paper leaves open (all are config fields of `ToyControlConfig`, documented there):
MLP width/activation, mean and σ bounds, teacher reward (−|s_{t+1} − target| per step), teacher REINFORCE
details (per-step batch-mean baseline), optimizers and learning rates, transition noise (none).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from opd.cli import require
from synthetic.estimators import discounted_coefficients, token_costs

Params = dict[str, jax.Array]
LEFT, RIGHT = 0, 1
TASK_NAMES = ("left", "right")


# ---------------------------------------------------------------------------------------------------
# CONFIG
# ---------------------------------------------------------------------------------------------------
@dataclass
class ToyControlConfig:
    """Every value of the toy study. Paper values are marked [paper]; the rest are our choices [ours]."""

    # Sweep. [paper] γ ∈ {0, .25, .5, .75, 1}; seeds 42, 43, 2026.
    gammas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    seeds: list[int] = field(default_factory=lambda: [42, 43, 2026])
    # Environment. [paper, read off figure axes] T = 20; starts ±2, targets ∓3.
    horizon: int = 20
    start: float = 2.0
    target: float = 3.0
    env_noise: float = 0.0  # [ours] extra N(0, env_noise) transition noise; 0: actions are the only noise
    # Policy network (student and teachers share the architecture). [paper] 3-layer MLP, ~4K params.
    hidden: int = 64  # [ours] 3→64→64→2 with tanh: 4,546 parameters
    position_scale: float = 5.0  # [ours] the position input is s / position_scale
    # [ours] µ = mean_max·tanh(raw / mean_max): a bounded step. None: µ = raw, unbounded (an ablation).
    mean_max: float | None = 2.0
    sigma_min: float = 0.1  # [ours] σ = exp(interp(sigmoid(raw), log σ_min, log σ_max)):
    sigma_max: float = 2.0  #        bounded, so the log-density ratio stays finite
    # [ours] the teachers' σ floor; None: the student's sigma_min. A smaller floor (an ablation) lets
    # REINFORCE sharpen a teacher, and r = (a − µ_q)²/2σ_q² + ... grows as 1/σ_q².
    teacher_sigma_min: float | None = None
    # Teachers: one per task, REINFORCE on reward −|s_{t+1} − target| per step, undiscounted
    # return-to-go minus the per-step batch mean (a baseline). [paper] "first trained with REINFORCE".
    teacher_iterations: int = 500  # [ours]
    teacher_batch: int = 64  # [ours]
    teacher_lr: float = 3e-3  # [ours] Adam
    # Distillation. [paper] 2000 iterations, batch B = 64 split into M = 8 micro-batches for the variance.
    iterations: int = 2000
    batch_size: int = 64
    micro_batches: int = 8
    student_optimizer: str = "adam"  # [ours] "adam" or "sgd" (plain SGD: an ablation; Adam rescales ĝ_γ)
    lr: float = 1e-3  # [ours] no gradient clipping
    # Evaluation at the end of training (heatmaps, final distance, reverse KL).
    eval_rollouts: int = 256  # [ours] per task
    heatmap_bins: int = 64  # [ours] position bins over [-heatmap_range, heatmap_range]
    heatmap_range: float = 8.0  # [paper, figure axis] −8..8; positions outside land in the edge bins
    heatmap_gammas: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])  # [paper] shown in Fig 1b


def validate(cfg: Any) -> None:
    """Raise opd.cli.ConfigError naming the first bad key; run before any computation."""
    require(len(cfg.gammas) >= 1, "gammas", "a non-empty list", list(cfg.gammas))
    for g in cfg.gammas:
        require(0.0 <= float(g) <= 1.0, "gammas", "values in [0, 1]", float(g))
    require(len(cfg.seeds) >= 1, "seeds", "a non-empty list", list(cfg.seeds))
    require(cfg.horizon >= 1, "horizon", "an integer >= 1", cfg.horizon)
    require(cfg.iterations >= 1, "iterations", "an integer >= 1", cfg.iterations)
    require(cfg.teacher_iterations >= 0, "teacher_iterations", "an integer >= 0", cfg.teacher_iterations)
    require(cfg.batch_size >= 2, "batch_size", "an integer >= 2", cfg.batch_size)
    require(cfg.micro_batches >= 2, "micro_batches", "an integer >= 2", cfg.micro_batches)
    require(
        cfg.batch_size % cfg.micro_batches == 0,
        "micro_batches",
        f"a divisor of batch_size={cfg.batch_size}",
        cfg.micro_batches,
    )
    require(cfg.teacher_batch >= 2, "teacher_batch", "an integer >= 2", cfg.teacher_batch)
    require(cfg.hidden >= 1, "hidden", "an integer >= 1", cfg.hidden)
    require(
        0.0 < cfg.sigma_min < cfg.sigma_max, "sigma_min", f"0 < sigma_min < sigma_max={cfg.sigma_max}", cfg.sigma_min
    )
    require(cfg.mean_max is None or cfg.mean_max > 0, "mean_max", "a positive number or null (unbounded)",
            cfg.mean_max)
    require(cfg.teacher_sigma_min is None or 0.0 < cfg.teacher_sigma_min < cfg.sigma_max, "teacher_sigma_min",
            f"null or 0 < teacher_sigma_min < sigma_max={cfg.sigma_max}", cfg.teacher_sigma_min)
    require(cfg.position_scale > 0, "position_scale", "a positive number", cfg.position_scale)
    require(cfg.env_noise >= 0, "env_noise", "a number >= 0", cfg.env_noise)
    require(cfg.student_optimizer in ("adam", "sgd"), "student_optimizer", "one of adam, sgd", cfg.student_optimizer)
    require(cfg.lr > 0, "lr", "a positive number", cfg.lr)
    require(cfg.teacher_lr > 0, "teacher_lr", "a positive number", cfg.teacher_lr)
    require(cfg.eval_rollouts >= 1, "eval_rollouts", "an integer >= 1", cfg.eval_rollouts)
    require(cfg.heatmap_bins >= 2, "heatmap_bins", "an integer >= 2", cfg.heatmap_bins)
    require(cfg.heatmap_range > 0, "heatmap_range", "a positive number", cfg.heatmap_range)
    gammas = [float(g) for g in cfg.gammas]
    for g in cfg.heatmap_gammas:
        require(float(g) in gammas, "heatmap_gammas", f"values among gammas={gammas}", float(g))


# ---------------------------------------------------------------------------------------------------
# POLICY: a plain-jnp MLP Gaussian policy (params are a dict pytree, trivially vmappable)
# ---------------------------------------------------------------------------------------------------
def init_mlp(rng: jax.Array, hidden: int) -> Params:
    """3 → hidden → hidden → 2 (mean, σ pre-activations). LeCun-normal weights, zero biases."""
    k1, k2, k3 = jax.random.split(rng, 3)
    init = jax.nn.initializers.lecun_normal()
    return {
        "w1": init(k1, (3, hidden)),
        "b1": jnp.zeros((hidden,)),
        "w2": init(k2, (hidden, hidden)),
        "b2": jnp.zeros((hidden,)),
        "w3": init(k3, (hidden, 2)),
        "b3": jnp.zeros((2,)),
    }


OUTPUT_LAYER = ("w3", "b3")  # the parameters the paper's variance proxy is measured on


def num_params(params: Params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def task_id(task: jax.Array) -> jax.Array:
    """Task-id input feature: −1 for left (task 0), +1 for right (task 1)."""
    return 2.0 * jnp.asarray(task, jnp.float32) - 1.0


def policy(
    params: Params, task: jax.Array, s: jax.Array, t: jax.Array, cfg: ToyControlConfig, *,
    teacher: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Mean and log σ of the action at position `s`, step `t` (any matching shapes; broadcast).
    `teacher=True` applies the teachers' σ floor (`teacher_sigma_min`)."""
    task, s, t = jnp.broadcast_arrays(task_id(task), s, jnp.asarray(t, jnp.float32))
    x_x3 = jnp.stack([task, s / cfg.position_scale, t / cfg.horizon], axis=-1)
    h = jnp.tanh(x_x3 @ params["w1"] + params["b1"])
    h = jnp.tanh(h @ params["w2"] + params["b2"])
    out = h @ params["w3"] + params["b3"]
    mean = out[..., 0] if cfg.mean_max is None else cfg.mean_max * jnp.tanh(out[..., 0] / cfg.mean_max)
    floor = cfg.teacher_sigma_min if teacher and cfg.teacher_sigma_min is not None else cfg.sigma_min
    lo, hi = jnp.log(floor), jnp.log(cfg.sigma_max)
    log_std = lo + (hi - lo) * jax.nn.sigmoid(out[..., 1])
    return mean, log_std


def gaussian_logpdf(a: jax.Array, mean: jax.Array, log_std: jax.Array) -> jax.Array:
    z = (a - mean) * jnp.exp(-log_std)
    return -0.5 * z**2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi)


def gaussian_log_ratio(
    a: jax.Array, mean_p: jax.Array, log_std_p: jax.Array, mean_q: jax.Array, log_std_q: jax.Array
) -> jax.Array:
    """OPD per-step cost r = log π(a) − log q(a) for Gaussian student π and teacher q (paper.md §1)."""
    return token_costs(gaussian_logpdf(a, mean_p, log_std_p), gaussian_logpdf(a, mean_q, log_std_q))


def gaussian_kl(mean_p: jax.Array, log_std_p: jax.Array, mean_q: jax.Array, log_std_q: jax.Array) -> jax.Array:
    """Closed-form KL(N(µp, σp) ‖ N(µq, σq)) = E_p[r]: the per-step reverse KL to the teacher."""
    var_ratio = jnp.exp(2.0 * (log_std_p - log_std_q))
    return log_std_q - log_std_p + 0.5 * (var_ratio + (mean_p - mean_q) ** 2 * jnp.exp(-2.0 * log_std_q) - 1.0)


# ---------------------------------------------------------------------------------------------------
# ENVIRONMENT
# ---------------------------------------------------------------------------------------------------
def task_start_target(task: jax.Array, cfg: ToyControlConfig) -> tuple[jax.Array, jax.Array]:
    sign = task_id(task)  # left: −1, right: +1
    return -sign * cfg.start, sign * cfg.target


class Trajectory(NamedTuple):
    states_NxT: jax.Array  # s_0 .. s_{T-1}: the states actions were taken in
    actions_NxT: jax.Array  # a_0 .. a_{T-1}
    positions_NxT1: jax.Array  # s_0 .. s_T (for visitation heatmaps and the final distance)


def rollout(
    params: Params, task: jax.Array, rng: jax.Array, n: int, cfg: ToyControlConfig, *, teacher: bool = False
) -> Trajectory:
    """n trajectories of the policy on `task`, sampled step by step (actions carry no gradient)."""
    s0, _ = task_start_target(task, cfg)
    s_N = jnp.full((n,), s0, jnp.float32)

    # SCAN BODY: one environment step for all n trajectories.
    def env_step(s_N, xs):
        t, key = xs
        k_a, k_env = jax.random.split(key)
        mean, log_std = policy(params, task, s_N, t, cfg, teacher=teacher)
        a_N = mean + jnp.exp(log_std) * jax.random.normal(k_a, s_N.shape)
        s_next = s_N + a_N + cfg.env_noise * jax.random.normal(k_env, s_N.shape)
        return s_next, (s_N, a_N)

    keys = jax.random.split(rng, cfg.horizon)
    s_T, (states_TxN, actions_TxN) = jax.lax.scan(env_step, s_N, (jnp.arange(cfg.horizon), keys))
    states_NxT = jax.lax.stop_gradient(states_TxN.T)
    actions_NxT = jax.lax.stop_gradient(actions_TxN.T)
    positions = jnp.concatenate([states_NxT, s_T[:, None]], axis=1)
    return Trajectory(states_NxT, actions_NxT, jax.lax.stop_gradient(positions))


# ---------------------------------------------------------------------------------------------------
# ESTIMATOR: the discounted OPD family ĝ_γ (paper Eq. 3) and the paper's variance proxy
# ---------------------------------------------------------------------------------------------------
def opd_surrogate(
    params: Params, student_fn, traj_NxT: Trajectory, logq_NxT: jax.Array, task: jax.Array, gamma: jax.Array
) -> jax.Array:
    """Surrogate whose gradient is the batch mean of ĝ_γ = Σ_t (Σ_{t'≥t} γ^{t'−t} r_{t'}) ∇log π(a_t|s_t),
    r_t = log π(a_t|s_t) − log q(a_t|s_t) held constant (stop_gradient), as the paper's REINFORCE form.

    Statistics (paper App. B; synthetic/bounds.py): unbiased for ∇ of the sequence-level reverse KL only at
    γ = 1; γ < 1 drops future-reward coupling terms and is biased (γ = 0 is token-level OPD). Variance grows
    with γ: with bounded r_t and actions drawn from the student itself, the worst case is O(T²) at γ = 0
    and O(T³) at γ = 1 (the paper's T⁴ bound is not reached on-policy); with stale or truncated rollouts
    (off-policy) O(T⁴) is reachable. Minimising it descends the reverse KL.
    """
    t_T = jnp.arange(traj_NxT.states_NxT.shape[1])
    mean, log_std = student_fn(params, task, traj_NxT.states_NxT, t_T[None, :])
    logp_NxT = gaussian_logpdf(traj_NxT.actions_NxT, mean, log_std)
    r_NxT = jax.lax.stop_gradient(token_costs(logp_NxT, logq_NxT))
    G_NxT = jax.vmap(discounted_coefficients, in_axes=(0, None))(r_NxT, gamma)
    return jnp.mean(jnp.sum(jax.lax.stop_gradient(G_NxT) * logp_NxT, axis=1))


def micro_batch_variance(g_MxP: jax.Array) -> jax.Array:
    """The paper's proxy: Var = (1/M) Σ_m ‖g_m − ḡ‖², ḡ = (1/M) Σ_m g_m, over flattened gradients."""
    assert g_MxP.ndim == 2, g_MxP.shape
    return jnp.mean(jnp.sum((g_MxP - g_MxP.mean(axis=0)) ** 2, axis=1))


def flatten_subset(grads: Params, names: tuple[str, ...]) -> jax.Array:
    """Per-micro-batch gradients (leading axis M) of the named leaves, flattened to [M, P]."""
    return jnp.concatenate([grads[k].reshape(grads[k].shape[0], -1) for k in names], axis=1)


# ---------------------------------------------------------------------------------------------------
# STUDY
# ---------------------------------------------------------------------------------------------------
class Trace(NamedTuple):
    """Per distillation iteration (leading axis I)."""

    grad_var: jax.Array  # paper's proxy on output-layer gradients
    grad_var_all: jax.Array  # the same proxy over all parameters
    grad_norm: jax.Array  # ‖ḡ‖ over all parameters
    reverse_kl: jax.Array  # E_traj Σ_t KL(π(·|s_t) ‖ q(·|s_t)) along the student's trajectories
    final_dist: jax.Array  # E |s_T − target|
    sigma: jax.Array  # mean student σ along the batch


class Evaluation(NamedTuple):
    """At the end of training, per task (leading axis K)."""

    counts_KxT1xX: jax.Array  # visitation counts of s_0..s_T in position bins
    final_dist_K: jax.Array  # E |s_T − target|
    success_K: jax.Array  # P(|s_T − target| < 1)
    reverse_kl_K: jax.Array  # E Σ_t KL(π ‖ q) along the policy's own trajectories
    outside_K: jax.Array  # fraction of visited positions outside ±heatmap_range


def make_study(cfg: ToyControlConfig):
    """Returns (study, parts). `study(seed_keys_S, gammas_G)` is jitted and vmapped over seeds and γ."""
    validate(cfg)
    T, N, M = cfg.horizon, cfg.batch_size, cfg.micro_batches

    def student_fn(params, task, s, t):
        return policy(params, task, s, t, cfg)

    def teacher_fn(params, task, s, t):
        return policy(params, task, s, t, cfg, teacher=True)

    def pick(stacked: Params, task: jax.Array) -> Params:
        return jax.tree.map(lambda x: x[task], stacked)

    # TEACHERS: REINFORCE with reward −|s_{t+1} − target|, per-step batch-mean baseline, Adam.
    teacher_opt = optax.adam(cfg.teacher_lr)

    def train_teacher(rng: jax.Array, task: jax.Array):
        k_init, k_loop = jax.random.split(rng)
        params = init_mlp(k_init, cfg.hidden)
        _, target = task_start_target(task, cfg)

        def loss_fn(p, traj):
            reward_NxT = -jnp.abs(traj.positions_NxT1[:, 1:] - target)
            rtg_NxT = jnp.flip(jnp.cumsum(jnp.flip(reward_NxT, 1), 1), 1)
            adv_NxT = rtg_NxT - rtg_NxT.mean(axis=0, keepdims=True)
            mean, log_std = teacher_fn(p, task, traj.states_NxT, jnp.arange(T)[None, :])
            logp = gaussian_logpdf(traj.actions_NxT, mean, log_std)
            return -jnp.mean(jnp.sum(adv_NxT * logp, axis=1)), reward_NxT.sum(1).mean()

        # SCAN BODY: one teacher REINFORCE iteration.
        def teacher_step(carry, key):
            p, opt_state = carry
            traj = rollout(p, task, key, cfg.teacher_batch, cfg, teacher=True)
            (_, ret), g = jax.value_and_grad(loss_fn, has_aux=True)(p, traj)
            upd, opt_state = teacher_opt.update(g, opt_state, p)
            return (optax.apply_updates(p, upd), opt_state), ret

        keys = jax.random.split(k_loop, cfg.teacher_iterations)
        (params, _), returns_I = jax.lax.scan(teacher_step, (params, teacher_opt.init(params)), keys)
        return params, returns_I

    def train_teachers(rng: jax.Array):
        """Both teachers (leading axis K = 2 on every leaf) and their per-iteration mean returns."""
        return jax.vmap(train_teacher)(jax.random.split(rng, 2), jnp.arange(2))

    def teacher_logq(teachers: Params, task: jax.Array, traj: Trajectory) -> jax.Array:
        q = pick(teachers, task)
        mean, log_std = teacher_fn(q, task, traj.states_NxT, jnp.arange(T)[None, :])
        return gaussian_logpdf(traj.actions_NxT, mean, log_std)

    def traj_reverse_kl(params, teacher, task, traj, params_are_teacher=False) -> jax.Array:
        t = jnp.arange(T)[None, :]
        mp, lp = (teacher_fn if params_are_teacher else student_fn)(params, task, traj.states_NxT, t)
        mq, lq = teacher_fn(teacher, task, traj.states_NxT, t)
        return jnp.mean(jnp.sum(gaussian_kl(mp, lp, mq, lq), axis=1))

    # DISTILLATION: alternating-task OPD with ĝ_γ; left on odd iterations, right on even (1-indexed).
    student_opt = optax.adam(cfg.lr) if cfg.student_optimizer == "adam" else optax.sgd(cfg.lr)

    def distill(k_init: jax.Array, k_loop: jax.Array, teachers: Params, gamma: jax.Array):
        params = init_mlp(k_init, cfg.hidden)

        # SCAN BODY: one OPD iteration.
        def opd_step(carry, xs):
            p, opt_state = carry
            it, key = xs
            task = 1 - (it % 2)  # it = 1, 3, ... → left (0); it = 2, 4, ... → right (1)
            traj = rollout(p, task, key, N, cfg)
            logq = teacher_logq(teachers, task, traj)
            mb = jax.tree.map(lambda x: x.reshape((M, N // M) + x.shape[1:]), (traj, logq))
            grads_M = jax.vmap(jax.grad(opd_surrogate), in_axes=(None, None, 0, 0, None, None))(
                p, student_fn, mb[0], mb[1], task, gamma
            )
            grads = jax.tree.map(lambda g: g.mean(axis=0), grads_M)  # = gradient of the batch mean
            upd, opt_state = student_opt.update(grads, opt_state, p)
            _, target = task_start_target(task, cfg)
            _, log_std = student_fn(p, task, traj.states_NxT, jnp.arange(T)[None, :])
            trace = Trace(
                grad_var=micro_batch_variance(flatten_subset(grads_M, OUTPUT_LAYER)),
                grad_var_all=micro_batch_variance(flatten_subset(grads_M, tuple(sorted(grads_M)))),
                grad_norm=optax.tree.norm(grads),
                reverse_kl=traj_reverse_kl(p, pick(teachers, task), task, traj),
                final_dist=jnp.mean(jnp.abs(traj.positions_NxT1[:, -1] - target)),
                sigma=jnp.mean(jnp.exp(log_std)),
            )
            return (optax.apply_updates(p, upd), opt_state), trace

        xs = (jnp.arange(1, cfg.iterations + 1), jax.random.split(k_loop, cfg.iterations))
        (params, _), trace = jax.lax.scan(opd_step, (params, student_opt.init(params)), xs)
        return params, trace

    # EVALUATION: visitation heatmaps and end-of-training metrics, per task.
    def evaluate_task(params: Params, teacher: Params, task: jax.Array, rng: jax.Array, is_teacher: bool):
        traj = rollout(params, task, rng, cfg.eval_rollouts, cfg, teacher=is_teacher)
        _, target = task_start_target(task, cfg)
        pos = traj.positions_NxT1
        X, R = cfg.heatmap_bins, cfg.heatmap_range
        idx = jnp.clip(jnp.floor((pos + R) / (2 * R) * X).astype(jnp.int32), 0, X - 1)
        counts = jax.nn.one_hot(idx, X).sum(axis=0)  # [T+1, X]
        dist = jnp.abs(pos[:, -1] - target)
        return (
            counts,
            dist.mean(),
            jnp.mean(dist < 1.0),
            traj_reverse_kl(params, teacher, task, traj, is_teacher),
            jnp.mean(jnp.abs(pos) > R),
        )

    def evaluate(params_K: Params, teachers: Params, rng: jax.Array, shared: bool) -> Evaluation:
        """params_K: one policy for both tasks (shared=True, the student) or one per task (teachers)."""
        keys = jax.random.split(rng, 2)
        in_axes = (None if shared else 0, 0, 0, 0)
        one_task = functools.partial(evaluate_task, is_teacher=not shared)
        return Evaluation(*jax.vmap(one_task, in_axes=in_axes)(params_K, teachers, jnp.arange(2), keys))

    def run_seed(key: jax.Array, gammas_G: jax.Array):
        k_teach, k_init, k_loop, k_eval = jax.random.split(key, 4)
        teachers, teacher_returns_KxI = train_teachers(k_teach)
        teacher_eval = evaluate(teachers, teachers, k_eval, shared=False)

        def run_gamma(gamma):
            student, trace = distill(k_init, k_loop, teachers, gamma)
            return trace, evaluate(student, teachers, k_eval, shared=True)

        trace_G, eval_G = jax.vmap(run_gamma)(gammas_G)
        return {"trace": trace_G, "eval": eval_G, "teacher_eval": teacher_eval, "teacher_returns": teacher_returns_KxI}

    study = jax.jit(jax.vmap(run_seed, in_axes=(0, None)))
    parts = {
        "train_teachers": train_teachers,
        "distill": distill,
        "evaluate": evaluate,
        "rollout": lambda p, task, rng, n, teacher=False: rollout(p, task, rng, n, cfg, teacher=teacher),
        "student_fn": student_fn,
        "teacher_fn": teacher_fn,
    }
    return study, parts


def seed_keys(seeds: list[int]) -> jax.Array:
    return jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds])
