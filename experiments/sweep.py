"""The sweep over width and attention unit that launch/sweep.sh iterates.

    python -m experiments.sweep   # prints "NAME ARGS..." for every run, one per line
"""

import itertools

CONFIG_FILES = {
    0.5: "experiments/alpha_0_5.py",
    0.75: "experiments/alpha_0_75.py",
    1.0: "experiments/alpha_1.py",
    1.25: "experiments/alpha_1_25.py",
    1.5: "experiments/alpha_1_5.py",
    1.75: "experiments/alpha_1_75.py",
    2.0: "experiments/alpha_2.py",
}
ATTENTIONS = ("separable", "mha", "linformer")


def runs():
    """(name, command-line arguments) for every (alpha, attention) pair."""
    for (alpha, config_file), attention in itertools.product(CONFIG_FILES.items(), ATTENTIONS):
        yield f"alpha{alpha}_{attention}", [f"--config={config_file}", f"--config.model.attention={attention}"]


if __name__ == "__main__":
    for name, args in runs():
        print(name, *args)
