"""Exact bias and variance of OPD gradient estimators on enumerable sequence models (issue 3, items 3-4, 6).

    python -m experiments.sandbox_variance                                   # V=3, T=4, γ=0, 16 random pairs
    python -m experiments.sandbox_variance -m mdp.horizon=1,2,3,4,5,6,7 estimator.gamma=0,0.5,1
    python -m experiments.sandbox_variance -m estimator=full_return mdp.horizon=2,4,6
    python -m experiments.sandbox_variance -m mdp=worst_token mdp.horizon=4,8,12,16
    python -m experiments.sandbox_variance -m mdp=worst_off_policy estimator=full_return mdp.horizon=4,8,12
    bash paper_figs/sandbox.sh                                               # every sandbox figure

One job = one (model family, V, T, estimator). For each of `mdp.num_pairs` student/teacher pairs
(random pairs are drawn from `seed`; the worst-case constructions of synthetic/bounds.py are
deterministic, one pair; `worst_gamma` is built for the job's estimator.gamma) the exact moments
(synthetic.exact, float64, all V^T sequences) are one row of metrics.jsonl: variance, bias, relative
bias, ‖∇KL‖, KL, B_r, B_g and every bound. metrics.json holds medians over pairs and the fraction of
pairs within each bound. Tokens are drawn from the student itself unless `mdp.behaviour_top_p` < 1: then
from the student's top-p nucleus (synthetic.behaviour, the rule of opd.sampling), without importance
weights, as the trainer's top-p rollouts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from opd.cli import entry_point, output_dir, require, require_choice
from opd.results import RunRecorder
from synthetic import behaviour, bounds, exact, tabular

ESTIMATOR_NAMES = ("discounted", "full_return", "lsm", "full_rkl")
MDP_KINDS = ("random", "worst_token", "worst_full_return", "worst_causal", "worst_off_policy", "worst_gamma")
CONSTRUCTION_VOCAB = {"worst_token": 2, "worst_full_return": 2, "worst_causal": 2, "worst_off_policy": 2,
                      "worst_gamma": 3}


@dataclass
class EstimatorConfig:
    name: str = "discounted"  # discounted (Eq. 3) | full_return (Eq. 1) | lsm (teacher top-k) | full_rkl (Eq. 4)
    gamma: float = 0.0  # discounted only: 0 token level, 1 causal sequence level
    k: int = 2  # lsm only: teacher top-k support size, 1 <= k <= V


@dataclass
class MDPConfig:
    # random | worst_token | worst_full_return | worst_causal | worst_off_policy | worst_gamma
    # (constructions in synthetic/bounds.py)
    kind: str = "random"
    vocab: int = 3  # V (the constructions fix it: V = 3 for worst_gamma, 2 for the others)
    horizon: int = 4  # T; V^T must not exceed synthetic.tabular.ENUMERATION_LIMIT
    student_scale: float = 1.0  # random: student logits ~ N(0, scale²)
    teacher_scale: float = 1.0  # random: teacher logits ~ N(0, scale²)
    num_pairs: int = 16  # random: student/teacher pairs per job
    delta: float = 0.1  # worst_token / worst_full_return: teacher mass on the disfavoured token
    behaviour_top_p: float = 1.0  # tokens from the student's top-p nucleus; 1.0: the student itself


@dataclass
class SandboxVarianceConfig:
    name: str = "sandbox_variance"
    seed: int = 0
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    mdp: MDPConfig = field(default_factory=MDPConfig)


cs = ConfigStore.instance()
cs.store(name="base_sandbox_variance", node=SandboxVarianceConfig)
cs.store(group="estimator", name="base_estimator", node=EstimatorConfig)
cs.store(group="mdp", name="base_mdp", node=MDPConfig)


def validate(cfg) -> None:
    """Every check before any computation; a ConfigError names the key and what is allowed."""
    est, mdp = cfg.estimator, cfg.mdp
    require_choice("estimator.name", est.name, ESTIMATOR_NAMES)
    require_choice("mdp.kind", mdp.kind, MDP_KINDS)
    require(0.0 <= est.gamma <= 1.0, "estimator.gamma", "a float in [0, 1]", est.gamma)
    require(mdp.vocab >= 2, "mdp.vocab", "an integer >= 2", mdp.vocab)
    require(mdp.horizon >= 1, "mdp.horizon", "an integer >= 1", mdp.horizon)
    require(mdp.vocab**mdp.horizon <= tabular.ENUMERATION_LIMIT, "mdp.horizon",
            f"V^T <= {tabular.ENUMERATION_LIMIT} for exact enumeration (longer horizons: synthetic.markov "
            "Monte Carlo)", mdp.horizon)
    require(mdp.num_pairs >= 1, "mdp.num_pairs", "an integer >= 1", mdp.num_pairs)
    require(mdp.student_scale > 0 and mdp.teacher_scale > 0, "mdp.student_scale/teacher_scale", "> 0",
            (mdp.student_scale, mdp.teacher_scale))
    require(0.0 < mdp.behaviour_top_p <= 1.0, "mdp.behaviour_top_p", "a float in (0, 1]", mdp.behaviour_top_p)
    if mdp.kind != "random":
        want = CONSTRUCTION_VOCAB[mdp.kind]
        require(mdp.vocab == want, "mdp.vocab", f"{want} for the {mdp.kind} construction", mdp.vocab)
        require(0.0 < mdp.delta < 0.5, "mdp.delta", "a float in (0, 0.5)", mdp.delta)
    if mdp.kind == "worst_gamma":
        require(est.name == "discounted", "estimator.name", "discounted for the worst_gamma construction",
                est.name)
    if est.name == "lsm":
        require(1 <= est.k <= mdp.vocab, "estimator.k", f"an integer in [1, V={mdp.vocab}]", est.k)


def pairs(cfg):
    """(student, teacher, tie) tables of this job."""
    mdp = cfg.mdp
    if mdp.kind == "worst_token":
        return [bounds.worst_token(mdp.horizon, mdp.delta)]
    if mdp.kind == "worst_full_return":
        return [bounds.worst_full_return(mdp.horizon, mdp.delta)]
    if mdp.kind == "worst_causal":
        return [bounds.worst_causal(mdp.horizon)]
    if mdp.kind == "worst_off_policy":
        return [bounds.worst_off_policy(mdp.horizon)]
    if mdp.kind == "worst_gamma":
        return [bounds.worst_gamma(mdp.horizon, cfg.estimator.gamma)]
    rng = np.random.default_rng(cfg.seed)
    rows = tabular.num_prefixes(mdp.vocab, mdp.horizon)
    return [(mdp.student_scale * rng.normal(size=(rows, mdp.vocab)),
             mdp.teacher_scale * rng.normal(size=(rows, mdp.vocab)), None) for _ in range(mdp.num_pairs)]


def moments(cfg, student, teacher, tie):
    est = cfg.estimator
    top_p = cfg.mdp.behaviour_top_p
    beta = None if top_p >= 1.0 else behaviour.behaviour_table(student, top_p=top_p)
    if est.name == "discounted":
        return exact.estimator_moments(student, teacher, est.gamma, tie=tie, behaviour_probs=beta)
    if est.name == "full_return":
        return exact.estimator_moments(student, teacher, None, tie=tie, behaviour_probs=beta)
    return exact.prefix_estimator_moments(student, teacher, est.name, k=est.k, tie=tie, behaviour_probs=beta)


def run(cfg, out_dir) -> dict:
    validate(cfg)
    recorder = RunRecorder(out_dir, OmegaConf.to_container(OmegaConf.structured(cfg)))
    horizon = cfg.mdp.horizon
    gamma = {"discounted": cfg.estimator.gamma, "full_return": None}.get(cfg.estimator.name, 0.0)
    rows = []
    for i, (student, teacher, tie) in enumerate(pairs(cfg)):
        m = moments(cfg, student, teacher, tie)
        b = (horizon, float(m.b_r), float(m.b_g))
        grad_norm = float(np.linalg.norm(m.grad))
        rows.append(recorder.log(
            i, variance=float(m.variance), bias=float(m.bias), rel_bias=float(m.bias) / max(grad_norm, 1e-300),
            grad_norm=grad_norm, kl=float(m.kl), b_r=b[1], b_g=b[2],
            bound_token=bounds.token_bound(*b), bound_sequence=bounds.sequence_bound(*b),
            bound_gamma=bounds.gamma_bound(*b, gamma), bound_tight_full=bounds.full_return_tight_bound(*b),
            bound_tabular=bounds.tabular_gamma_bound(*b, gamma),
            bound_martingale=bounds.martingale_gamma_bound(*b, gamma),
        ))
    keys = ("variance", "bias", "rel_bias", "grad_norm", "kl", "b_r", "b_g", "bound_token", "bound_sequence",
            "bound_gamma", "bound_tight_full", "bound_tabular", "bound_martingale")
    final = {f"median_{k}": float(np.median([r[k] for r in rows])) for k in keys}
    final["geomean_variance"] = float(np.exp(np.mean([np.log(max(r["variance"], 1e-300)) for r in rows])))
    final["num_pairs"] = len(rows)
    for k in ("bound_gamma", "bound_token", "bound_sequence", "bound_martingale"):
        final[f"frac_within_{k}"] = float(np.mean([r["variance"] <= r[k] for r in rows]))
    recorder.finish(final)
    return final


@hydra.main(version_base="1.3", config_path="../conf", config_name="sandbox_variance")
@entry_point
def main(cfg: DictConfig) -> None:
    validate(cfg)
    final = run(cfg, output_dir())
    print(f"sandbox_variance {cfg.mdp.kind} V={cfg.mdp.vocab} T={cfg.mdp.horizon} {cfg.estimator.name} "
          f"gamma={cfg.estimator.gamma}: median variance {final['median_variance']:.4g}, "
          f"median rel. bias {final['median_rel_bias']:.3g} -> {output_dir()}")


if __name__ == "__main__":
    main()
