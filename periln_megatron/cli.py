"""Console scripts: `periln-train` (train_command) and `periln-params`."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys

from periln_megatron.config import RecipeError, load_recipe

EPILOG = """exit status: 0 finished; 75 saved after SIGTERM/SIGUSR1, Ctrl-C (SIGINT) or --exit-after-minutes
(requeue); 130 Ctrl-C pressed again 0.5 s or more after the first (presses within 0.5 s of it count as
one): stopped at once without saving; 3 loss or grad norm became NaN/Inf;
2 invalid recipe or arguments, a checkpoint that cannot be resumed (damaged, another model shape, or another
schedule without checkpoint.on_schedule_change), or checkpoint.dir / the run dir in use by another run.
Under torchrun launch with `periln-launch` (= python -m periln_megatron.launch, torchrun's arguments):
torchrun itself exits 1 whatever the ranks' status; periln-launch exits with it (75: requeue)."""


def train_command() -> None:
    """`periln-train` and `python -m periln_megatron.train`: train_main, then end the process without
    tearing torch's and megatron-core's module graph down, which takes ~2 s per rank after training
    (training/fork.py: exit_now; threads are joined, atexit handlers run, output flushed). An uncaught
    exception still ends the interpreter the usual way, with its traceback."""
    from periln_megatron.training.fork import exit_now, exit_status

    try:
        code = train_main()
    except SystemExit as e:  # argparse: --help, or a usage error
        code = exit_status(e)
    exit_now(code)


def train_main(argv: list[str] | None = None) -> int:
    code = 1  # an exception
    try:
        code = _train_main(argv)
        return code
    except SystemExit as e:  # argparse: --help, or a usage error
        code = e.code if isinstance(e.code, int) else 2
        raise
    finally:
        from periln_megatron.distributed.launch import record_status

        record_status(code)  # for periln-launch, when it started this rank


def _train_main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="periln-train", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a Peri-LN (or baseline) GPT with megatron-core. Launch one process per device with "
                    "periln-launch (torchrun's arguments) or srun; resumes automatically from checkpoint.dir.")
    parser.add_argument("--help-recipe", action=_RecipeReference, nargs=0,
                        help="print every recipe key (type, default, allowed values, meaning), how `base:` and "
                             "--set combine, and how the vocabulary is sized, then exit (= docs/recipes.md)")
    parser.add_argument("--recipe", required=True, help="recipe YAML, e.g. recipes/peri_ln/400m.yaml")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override recipe keys, e.g. --set model.num_layers=4 parallel.tp=2 (values are YAML)")
    parser.add_argument("--exit-after-minutes", type=float, default=None,
                        help="save a checkpoint and exit 75 after this many minutes")
    args = parser.parse_args(argv)

    from periln_megatron.checkpoint import CheckpointError, check_resumable
    from periln_megatron.data.datasets import TokenIdError
    from periln_megatron.distributed.dist_env import launch_environment, read_dist_env

    try:
        dist = read_dist_env()
        recipe = load_recipe(args.recipe, args.overrides, world_size=dist.world_size)
        # before CUDA starts (torchrun or srun without periln-launch / slurm/common.sh)
        os.environ.update(launch_environment(recipe.parallel.tp, recipe.parallel.cp))
        from periln_megatron.data.datasets import check_prefixes, resolve_tokenizer, with_tokenizer_size

        tokenizer = resolve_tokenizer(recipe)
        recipe = with_tokenizer_size(recipe, tokenizer)
        check_prefixes(recipe)
        check_resumable(recipe, dist.world_size, log=lambda msg: print(msg, flush=True) if dist.rank == 0 else None)
    except (RecipeError, ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"periln-train: error: {e}", file=sys.stderr, flush=True)
        return 2

    from periln_megatron.training import run_lock
    from periln_megatron.distributed import runtime
    from periln_megatron.exit_codes import EXIT_NONFINITE
    from periln_megatron.training.loop import NonFiniteError, StabilityStop, train

    try:
        return train(recipe, tokenizer, exit_after_minutes=args.exit_after_minutes)
    except NonFiniteError as e:
        print(f"periln-train: error: {e}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    except StabilityStop as e:
        print(f"periln-train: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except (CheckpointError, TokenIdError) as e:
        print(f"periln-train: error: {e}", file=sys.stderr, flush=True)
        return 2
    except run_lock.RunLockError as e:  # another run holds the directory; only rank 0 has the message
        if str(e):
            print(f"periln-train: error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:  # noqa: BLE001 - a full disk or a read-only path deserves one line, not a traceback
        storage = _storage_error(e)
        if storage is None or os.environ.get("PERILN_DEBUG"):
            raise
        print(f"periln-train: error: {storage.filename or 'a file'}: {storage.strerror} "
              f"({type(e).__name__ if e is not storage else 'writing'}; PERILN_DEBUG=1 shows the traceback)",
              file=sys.stderr, flush=True)
        return 2
    finally:
        runtime.shutdown()
        run_lock.release_all()


class _RecipeReference(argparse.Action):
    """--help-recipe: like --help, it prints and exits before --recipe is required."""

    def __call__(self, parser, namespace, values, option_string=None):
        from periln_megatron.config.reference import reference_markdown

        sys.stdout.write(reference_markdown())
        parser.exit(0)


def _storage_error(error: BaseException) -> OSError | None:
    """The disk-full / read-only / permission OSError behind `error` (megatron-core re-raises them as
    a bare Exception, e.g. "Failed to write dataset materials to the data cache directory")."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            return error
        error = error.__cause__ or error.__context__
    return None


def _human(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def params_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="periln-params", description="Parameter counts of recipes (total, non-embedding), and the check "
        "that a recipe's `nominal_size` is within 10% of its total. Exits 1 if one is not. With --memory, the "
        "estimated per-GPU memory at the recipe's layout (periln_megatron/model/memory.py).")
    parser.add_argument("recipes", nargs="+", help="recipe YAML files")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true", help="one JSON object per recipe")
    parser.add_argument("--memory", action="store_true",
                        help="also estimate the memory of one GPU of each pipeline stage: weights, gradients, "
                             "optimizer shard, activations at the micro batch and recompute, logits")
    parser.add_argument("--gpus", type=positive_int, default=8, metavar="N",
                        help="GPUs of the job, for the data-parallel size (default 8: one node)")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                        help="the implementation to estimate: gpu = the image's TE/apex fusions (default); "
                             "cpu = these CPU runs, unfused")
    parser.add_argument("--gpu-gib", type=float, default=79.6, metavar="GIB",
                        help="memory of one GPU, for the percentage (default 79.6: an H100 80GB)")
    args = parser.parse_args(argv)

    from periln_megatron.model.memory import estimate, format_estimate
    from periln_megatron.model.param_count import count_parameters

    status = 0
    for path in args.recipes:
        try:
            recipe = load_recipe(path, args.overrides, check_environment=False,
                                 world_size=args.gpus if args.memory else None)
        except RecipeError as e:
            print(f"periln-params: error: {e}" + (f" (on --gpus {args.gpus})" if args.memory else ""), file=sys.stderr)
            status = 2
            continue
        counts = count_parameters(recipe)
        counts["recipe"] = path
        if recipe.nominal_size:
            counts["nominal"] = recipe.nominal_size
            counts["deviation"] = counts["total"] / recipe.nominal_params() - 1
            if abs(counts["deviation"]) > 0.10:
                status = max(status, 1)
        memory = None
        if args.memory:
            try:
                memory = estimate(recipe, args.gpus, device=args.device)
            except ValueError as e:
                print(f"periln-params: error: {path}: --gpus {args.gpus}: {e}", file=sys.stderr)
                status = 2
                continue
            counts["memory"] = memory.to_dict()
        if args.json:
            print(json.dumps(counts))
        else:
            line = (f"{path}: total {_human(counts['total'])} ({counts['total']:,}), non-embedding "
                    f"{_human(counts['non_embedding'])} ({counts['non_embedding']:,}), vocab {counts['padded_vocab']:,}")
            if "nominal" in counts:
                line += f", nominal {counts['nominal']} ({counts['deviation']:+.1%})"
            print(line)
            if memory is not None:
                print(format_estimate(path, recipe, memory, args.gpu_gib))
    return status


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
