"""The small training config the training tests share (one compile serves them all)."""

from experiments import quickstart


# The same config as command-line flags for experiments/quickstart.py (subprocess tests).
CLI_FLAGS = [
    "--config.batch_size=32", "--config.eval_batch_size=64", "--config.num_epochs=1",
    "--config.log_every_steps=2", "--config.eval_every_steps=1000", "--config.optim.warmup_steps=2",
    "--config.optim.schedule=constant", "--config.checkpoint_every_steps=1000",
    "--config.data.mix_prob=0.5", "--config.data.randaugment=True",
]


def small_config(**data_overrides):
    config = quickstart.get_config()
    config.batch_size = 32
    config.eval_batch_size = 64
    config.num_epochs = 1
    config.log_every_steps = 2
    config.eval_every_steps = 1000
    config.optim.warmup_steps = 2
    # A constant schedule does not depend on the run's length, so runs of any length (and
    # subprocesses, through the persistent cache) share one compiled train step.
    config.optim.schedule = "constant"
    config.checkpoint_every_steps = 1000
    config.data.mix_prob = 0.5  # exercise Mixup/CutMix and RandAugment in the tests
    config.data.randaugment = True
    for key, value in data_overrides.items():
        config.data[key] = value
    return config
