"""`twotower batch --engine ray`: the same requests and outputs as `twotower batch`, decoded by a pool
of model actors on a Ray cluster (a local one on 127.0.0.1 unless --ray-address names another), read
from a directory or glob of JSONL / Parquet files and written as one output file per input block
(see ray_files). Imports Ray only when the command runs, so the core package never does.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from pathlib import Path

from ..decode.engine import MODES
from ..integrations.ray_files import DEFAULT_ROWS_PER_FILE, input_files, output_lock, plan_job, read_done, write_errors
from .options import CLIError, batch_limits, default_options

ENGINES = ("local", "ray")
ROWS_PER_CALL_FACTOR = 4  # a predictor call gets this many engine batches of rows (fewer half-empty tails)


def add_ray_options(p: argparse.ArgumentParser) -> None:
    """`--engine` and the options of the Ray engine, for `twotower batch`."""
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local: this process (or torchrun's); ray: a pool of model actors on a Ray cluster, needs "
        "pip install 'twotower[ray]' (default: local)",
    )
    g = p.add_argument_group("ray engine (--engine ray)")
    g.add_argument(
        "--actors", type=int, default=None, help="model actors (default: GPUs / --gpus-per-actor, or 1 without GPUs)"
    )
    g.add_argument(
        "--gpus-per-actor",
        type=float,
        default=None,
        help="GPUs per actor: 1, or 2 with the towers split over them (--device auto, or cuda:0 + "
        "--denoiser-device cuda:1); inside an actor its GPUs count from 0 (default: 1 when --device is not "
        "cpu and the cluster has GPUs, else 0)",
    )
    g.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs reserved per actor (default: 1)")
    g.add_argument(
        "--rows-per-file",
        type=int,
        default=DEFAULT_ROWS_PER_FILE,
        help=f"input rows per block, the unit of one output file (default: {DEFAULT_ROWS_PER_FILE})",
    )
    g.add_argument(
        "--ray-address",
        default=None,
        help="the Ray cluster, e.g. auto (the one started with `ray start` on this machine) or HEAD_IP:6379 "
        "(default: $RAY_ADDRESS, else a new local cluster that listens on 127.0.0.1 only)",
    )


def cmd_batch_ray(args: argparse.Namespace, *, predictor_cls: type | None = None) -> int:
    """Run the job; `predictor_cls` replaces `TwoTowerPredictor` (tests use it to kill an actor)."""
    check_installed()
    from ..loading import resolve_model_path
    from ..tokenizer import Tokenizer

    if args.mode not in MODES:
        raise CLIError(f"batch decodes modes {', '.join(MODES)} (continuous batching); {args.mode} is not one")
    if args.max_batch_size < 1:
        raise CLIError("--max-batch-size must be at least 1")
    files = input_files(args.input)
    output = check_output(args.output, files)
    defaults = default_options(args)
    model_path = resolve_model_path(args.model)
    tokenizer = Tokenizer.load(model_path)
    with output_lock(output):
        plan = plan_job(
            files,
            tokenizer=tokenizer,
            defaults=defaults,
            limits=batch_limits(args),
            done=read_done(output),
            rows_per_file=args.rows_per_file,
        )
        errors = write_errors(output, plan.errors)
        if plan.errors:
            print(f"{len(plan.errors)} input row(s) rejected: see {errors}", file=sys.stderr)
        model = None if args.model is None else str(model_path.resolve())  # actors may start elsewhere
        summary = run_on_cluster(args, plan, output, defaults, model, predictor_cls)
    print(summary.line(), file=sys.stderr)
    return 0


def run_on_cluster(args, plan, output: Path, defaults, model: str | None, predictor_cls: type | None):
    """Connect (or start a loopback-only local cluster), run the plan, and shut down what was started."""
    from ..integrations.ray import TwoTowerPredictor
    from ..integrations.ray_cluster import ClusterError, cluster_resources, connect
    from ..integrations.ray_job import JobSummary, run_job

    if not plan.pending:
        return JobSummary(skipped=plan.done, rejected=len(plan.errors))
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    try:
        started = connect(address)  # before `import ray`: see ray_cluster
    except ClusterError as err:
        raise CLIError(str(err)) from None
    import ray

    try:
        pool = actor_pool(args, cluster_resources(), fixed=address is None)
        kwargs = dict(
            model=model,
            dtype=args.dtype,
            device=args.device,
            denoiser_device=args.denoiser_device,
            quantize=args.quantize,
            defaults=defaults,
            max_batch_size=args.max_batch_size,
            max_prompt_tokens=args.max_prompt_tokens,
            seed=args.seed,
            stop_at_eos=not args.no_eos,
            engine_step=args.engine_step,
        )
        return run_job(
            plan,
            output,
            predictor_kwargs=kwargs,
            pool=pool,
            predictor_cls=predictor_cls or TwoTowerPredictor,
            progress=not args.no_progress,
        )
    except ray.exceptions.RayError as err:
        raise CLIError(
            f"the Ray job failed: {root_cause(err)}; the output files written so far are kept, so re-running "
            "the same command decodes only the rest"
        ) from None
    finally:
        if started:
            ray.shutdown()


def check_installed() -> None:
    missing = [name for name in ("ray", "pyarrow") if importlib.util.find_spec(name) is None]
    if missing:
        raise CLIError(f"--engine ray needs {' and '.join(missing)}: pip install 'twotower[ray]'")


def check_output(output: Path, files: list[Path]) -> Path:
    """The output directory (created); CLIError if it is a file or holds an input file."""
    if output.exists() and not output.is_dir():
        raise CLIError(f"--output {output} must be a directory with --engine ray")
    output.mkdir(parents=True, exist_ok=True)
    root = output.resolve()
    inside = [f for f in files if f.resolve().is_relative_to(root)]
    if inside:
        raise CLIError(f"--output {output} holds input file {inside[0]}: give another directory")
    return output


def actor_pool(args: argparse.Namespace, cluster: dict[str, float], *, fixed: bool = True):
    """The actor pool the options ask for, checked against the cluster's CPUs and GPUs: a pool that
    does not fit is an error on a `fixed` cluster (the local one), a warning on one that may grow."""
    from ..integrations.ray_job import ActorPool

    gpus_in_cluster = float(cluster.get("GPU", 0))
    on_gpu = args.device not in ("cpu", "auto") or args.denoiser_device not in (None, "cpu")
    gpus = args.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if (on_gpu or args.device == "auto") and gpus_in_cluster > 0 else 0.0
    if gpus > 0 and args.device == "cpu" and args.denoiser_device in (None, "cpu"):
        raise CLIError(
            "--gpus-per-actor gives each actor GPUs, but --device cpu keeps the model off them: pass --device cuda (or auto)"
        )
    if on_gpu and gpus == 0:
        raise CLIError(
            f"--device {args.device} needs GPUs in each actor: pass --gpus-per-actor 1 (2 to split the towers)"
        )
    actors = args.actors if args.actors is not None else (max(1, int(gpus_in_cluster // gpus)) if gpus else 1)
    if actors < 1:
        raise CLIError("--actors must be at least 1")
    try:
        pool = ActorPool(
            actors=actors,
            gpus_per_actor=gpus,
            cpus_per_actor=args.cpus_per_actor,
            rows_per_call=ROWS_PER_CALL_FACTOR * args.max_batch_size,
        )
    except ValueError as err:
        raise CLIError(str(err)) from None
    short = shortfall(pool, cluster)
    if short and fixed:
        raise CLIError(short)
    if short:
        print(f"warning: {short}; the job waits until the cluster has room", file=sys.stderr)
    return pool


def shortfall(pool, cluster: dict[str, float]) -> str | None:
    """Why the cluster cannot hold the pool now (None when it can)."""
    for name, per_actor in (("GPU", pool.gpus_per_actor), ("CPU", pool.cpus_per_actor)):
        have = float(cluster.get(name, 0))
        if per_actor > have:
            return f"each actor asks for {per_actor:g} {name}(s) but the cluster has {have:g}"
        if pool.actors * per_actor > have:
            return f"{pool.actors} actors x {per_actor:g} {name}(s) need {pool.actors * per_actor:g}, the cluster has {have:g}"
    return None


EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")


def root_cause(err: BaseException) -> str:
    """The original exception line in a Ray error's text ("RuntimeError: ..."; Ray's text carries the
    remote traceback and its own wrappers), else its first line."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    for line in lines:
        match = EXCEPTION_LINE.match(line)
        if match and not match.group(1).startswith("ray."):
            return line
    return next((line for line in lines if line), type(err).__name__)
