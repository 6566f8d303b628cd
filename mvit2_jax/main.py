"""Train or evaluate a model of any task (the config's `task` field).

    python -m mvit2_jax.main --config=experiments/alpha_1.py --workdir=DIR [--config.FIELD=VALUE ...]
    python -m mvit2_jax.main --config=experiments/alpha_1.py --workdir=DIR --mode=eval

Running the same command again resumes from the latest checkpoint in DIR. Multi-host:
jax.distributed is initialized automatically on Cloud TPU pods and under SLURM, or from
--coordinator_address/--num_processes/--process_id.

Exit status: 0 done; 2 a configuration, flag or data error (one line on stderr says what to
change); 3 too many non-finite steps; 143 preempted (checkpoint saved: run again to resume).
Any other failure is a bug or an environment fault and prints its traceback.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mvit2_jax import allocator
from mvit2_jax.errors import EXIT_NONFINITE, EXIT_USAGE, USAGE_ERRORS, NonFiniteError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config file (experiments/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints and logs of this run")
flags.DEFINE_string("checkpoint", None, "--mode=eval: a converted model or run to evaluate (default: --workdir)")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (and evaluate), or evaluate the latest checkpoint")
flags.DEFINE_string("eval_split", None, "--mode=eval: split to evaluate (default: config.data.eval_split)")
flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0")
flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
flags.DEFINE_integer("process_id", None, "multi-process: this process's index")
flags.DEFINE_string("cpu_collectives", "gloo", "CPU multi-process collectives implementation")
flags.DEFINE_string("compilation_cache", None, "the persistent XLA compilation cache: on (~/.cache/mvit2_jax/xla), off, "
                    "or a directory (default: $MVIT2_COMPILATION_CACHE, else on; see mvit2_jax.compile_cache)")
flags.mark_flags_as_required(["config"])


def _init_distributed() -> None:
    import jax

    if FLAGS.coordinator_address or FLAGS.num_processes:
        if FLAGS.cpu_collectives:
            jax.config.update("jax_cpu_collectives_implementation", FLAGS.cpu_collectives)
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize()  # auto-detects the cluster


class _QuietLibraries:
    """Drop the INFO chatter of Orbax and TFDS from the log; their warnings still show."""

    NOISY = ("/orbax/", "/tensorflow_datasets/", "/clu/data/")

    def filter(self, record) -> bool:
        return record.levelno >= 30 or not any(part in record.pathname for part in self.NOISY)


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(_QuietLibraries())
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # tf.data only: keep accelerators for JAX
    from mvit2_jax import compile_cache

    cache_dir = compile_cache.enable(FLAGS.compilation_cache)
    allocator.run_cpu_computations_inline()  # one step's temporaries at a time on the CPU
    _init_distributed()
    import jax

    from mvit2_jax import train
    from mvit2_jax.errors import ConfigError

    logging.info("JAX process %d/%d, %d local / %d global devices (%s); compilation cache: %s", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count(), jax.default_backend(), cache_dir or "off")
    try:
        if FLAGS.mode == "eval":
            if not (FLAGS.checkpoint or FLAGS.workdir):
                raise ConfigError("--mode=eval needs --workdir=RUN_DIR or --checkpoint=MODEL_DIR")
            metrics = train.evaluate_checkpoint(FLAGS.config, FLAGS.checkpoint or FLAGS.workdir, FLAGS.eval_split)
        else:
            if not FLAGS.workdir:
                raise ConfigError("training needs --workdir=DIR (checkpoints and logs go there)")
            metrics = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except USAGE_ERRORS as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except NonFiniteError as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_NONFINITE)
    if jax.process_index() == 0 and metrics:
        print(" ".join(f"{k}={v:.6f}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items())))


def parse_flags(argv):
    """absl's parser, with a one-line error for a --config.FIELD that the config does not have."""
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError) as e:
        bad = [a for a in argv if a.startswith("--config.")]
        field = str(e).strip("\"'")
        print(f"error: unknown config field {field!r} (in {' '.join(bad)}): see experiments/base.py for the fields", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    allocator.maybe_reexec()
    app.run(main, flags_parser=parse_flags)
