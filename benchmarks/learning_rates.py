"""The learning demonstration over several RL seeds from one warm start (`benchmarks.learning
--rl-seeds 0,1,2,3`): how often each goal is met, not whether one draw met it.

One RL draw is not a result here: from the same warm start the RL seed (prompt order, sampling)
alone has moved the lift from 0 to 17 points and decided whether the alpha = 0 run falls into the
trap (README, "Why runs differ"). So the report counts, per goal, the seeds that met it, and
compares the two runs' final RaPR seed by seed (a sign test): whether RL without the bonus zooms
less than RL with it is a claim about the population of draws, which a rate can support.
"""
from __future__ import annotations

from pathlib import Path
from statistics import fmean


def across_seeds(per_seed: dict[str, dict]) -> dict:
    """Counts of seeds meeting each goal (and all of them), and the spread of the lift, from
    `results_of` per RL seed."""
    if not per_seed:
        raise ValueError("no RL seed ran")
    goals = list(next(iter(per_seed.values()))["goals"])
    lifts = [results["lift"] for results in per_seed.values()]
    return {
        "seeds": len(per_seed),
        "goals_met": {goal: sum(results["goals"][goal] for results in per_seed.values()) for goal in goals},
        "all_goals_met": sum(all(results["goals"].values()) for results in per_seed.values()),
        "lift": {"mean": fmean(lifts), "min": min(lifts), "max": max(lifts)},
        "final_rapr": paired_final_rapr(per_seed),
    }


def paired_final_rapr(per_seed: dict[str, dict]) -> dict:
    """Each arm's mean final RaPR, and per seed whether the alpha = 0 run ended below, level with or
    above the curiosity run (same seed, same warm start: a pair). `sign_test_p` is the one-sided
    sign test of "alpha = 0 ends below more often than above" over the untied pairs (None when all
    tie): the chance of at least this many "below" if neither direction were likelier."""
    from scipy.stats import binomtest

    pairs = [(results["final"]["no-curiosity"]["rapr"], results["final"]["curiosity"]["rapr"])
             for results in per_seed.values()]
    below = sum(without < with_bonus for without, with_bonus in pairs)
    above = sum(without > with_bonus for without, with_bonus in pairs)
    untied = below + above
    return {
        "curiosity_mean": fmean(with_bonus for _, with_bonus in pairs),
        "no_curiosity_mean": fmean(without for without, _ in pairs),
        "alpha0_below": below, "level": len(pairs) - untied, "alpha0_above": above,
        "sign_test_p": binomtest(below, untied, 0.5, alternative="greater").pvalue if untied else None,
    }


def _early_payoff(results: dict) -> str:
    """The alpha = 0 run's sampled answers right with / without a visual operation in its first
    steps ("-" where a run lacked either kind, or results predate the split)."""
    split = results.get("early_split", {}).get("no-curiosity")
    return f"{split['pixel_reasoning']:.0%} / {split['text_only']:.0%}" if split else "-"


LATE_STEPS = 5


def _late_sampled_rapr(results: dict) -> str:
    """The alpha = 0 run's RaPR in its last training batches (sampled): near 0 in a lasting trap,
    while a run that the greedy measure counts as trapped can still be zooming there."""
    rapr = results["curves"]["no-curiosity"].get("train_rapr", [])[-LATE_STEPS:]
    return f"{fmean(rapr):.2f}" if rapr else "-"


def format_rates_table(per_seed: dict[str, dict], rates: dict) -> str:
    header = (f"{'RL seed':<9}{'warm start':>11}{'curiosity acc/RaPR':>20}{'alpha 0 acc/RaPR':>18}"
              f"{'alpha 0 early zooms/guesses right':>35}{'alpha 0 late sampled RaPR':>27}{'lift':>8}  goals")
    lines = [header]
    for seed, results in per_seed.items():
        final = results["final"]
        lines.append(f"{seed:<9}{results['warm_start']['accuracy']:>11.3f}"
                     f"{final['curiosity']['accuracy']:>13.3f} / {final['curiosity']['rapr']:.2f}"
                     f"{final['no-curiosity']['accuracy']:>11.3f} / {final['no-curiosity']['rapr']:.2f}"
                     f"{_early_payoff(results):>35}{_late_sampled_rapr(results):>27}"
                     f"{results['lift'] * 100:>+8.1f}  {sum(results['goals'].values())} of {len(results['goals'])}")
    count = rates["seeds"]
    lines += [f"[{met} of {count} seeds] {goal}" for goal, met in rates["goals_met"].items()]
    lines.append(f"all goals met together: {rates['all_goals_met']} of {count} seeds")
    lift = rates["lift"]
    lines.append(f"lift with curiosity: mean {lift['mean'] * 100:+.1f} points "
                 f"(min {lift['min'] * 100:+.1f}, max {lift['max'] * 100:+.1f})")
    rapr = rates["final_rapr"]
    p_value = "-" if rapr["sign_test_p"] is None else f"{rapr['sign_test_p']:.3f}"
    lines.append(f"final RaPR: curiosity mean {rapr['curiosity_mean']:.2f}, alpha 0 mean {rapr['no_curiosity_mean']:.2f}; "
                 f"alpha 0 below / level / above: {rapr['alpha0_below']} / {rapr['level']} / {rapr['alpha0_above']} "
                 f"(one-sided sign test p = {p_value})")
    return "\n".join(lines)


def plot_seeds(per_seed: dict[str, dict], path: Path) -> Path:
    """Held-out accuracy and RaPR per step, and the training batches' RaPR (sampled: there the
    greedy curves' overlapping runs part): one colour per RL seed, solid with curiosity, dashed
    without."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy, rapr, sampled) = plt.subplots(1, 3, figsize=(17, 4), constrained_layout=True)
    colours = plt.get_cmap("tab10")
    for index, (seed, results) in enumerate(per_seed.items()):
        for name, style in (("curiosity", "o-"), ("no-curiosity", "x--")):
            c = results["curves"][name]
            label = f"seed {seed}, {'curiosity' if name == 'curiosity' else 'alpha = 0'}"
            accuracy.plot(c["eval_steps"], c["eval_accuracy"], style, color=colours(index % 10), label=label)
            rapr.plot(c["eval_steps"], c["eval_rapr"], style, color=colours(index % 10), label=label)
            sampled.plot(c["train_steps"], c["train_rapr"], style[1:], color=colours(index % 10), label=label)
    accuracy.set(title="held-out accuracy (greedy)", xlabel="RL step", ylabel="accuracy", ylim=(-0.02, 1.02))
    rapr.set(title="held-out RaPR (greedy)", xlabel="RL step", ylabel="RaPR", ylim=(-0.02, 1.02))
    sampled.set(title="training batches' RaPR (sampled)", xlabel="RL step", ylabel="RaPR", ylim=(-0.02, 1.02))
    accuracy.legend(fontsize=7, ncol=2)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
