"""The sweep over width and attention unit that launch/sweep.sh iterates.

    python -m experiments.sweep   # prints "NAME ARGS..." for every run, one per line
"""

import itertools

from mvit2_jax.models import ATTENTION_TYPES, VARIANTS

# experiments/alpha_0_5.py, alpha_0_75.py, alpha_1.py, ..., alpha_2.py
CONFIG_FILES = {alpha: f"experiments/alpha_{str(alpha).replace('.', '_').removesuffix('_0')}.py" for alpha in VARIANTS}
ATTENTIONS = ATTENTION_TYPES


def runs():
    """(name, command-line arguments) for every (alpha, attention) pair."""
    for (alpha, config_file), attention in itertools.product(CONFIG_FILES.items(), ATTENTIONS):
        yield f"alpha{alpha}_{attention}", [f"--config={config_file}", f"--config.model.attention={attention}"]


if __name__ == "__main__":
    for name, args in runs():
        print(name, *args)
