"""Command line: ``python -m studies list | run NAME | report NAME | estimate NAME | mlflow | sync-mlflow NAME |
methods | tasks`` (and ``prepare NAME | --study NAME``: make data sets once, ``studies.engine.prepare``).

Bad input (unknown study, method, task or scale, a misspelled hyperparameter,
an out-of-range value) prints one line naming the key, the value and what is
allowed, and exits with status 2 before Ray starts or anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from regtune.space import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies", description="regtune hyperparameter studies")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the study catalog with scales")
    sub.add_parser("methods", help="registered methods and their hyperparameters")
    sub.add_parser("tasks", help="registered tasks")
    sub.add_parser("prepare", help="make a data set once (CIFAR, an ImageNet folder's index, a text corpus's tokens) "
                                   "or all a study needs: prepare NAME | --study NAME [--scale S] (-h: options)")
    for name in ("run", "report"):
        s = sub.add_parser(name, help=f"{name} a study")
        s.add_argument("study")
        s.add_argument("--scale", default=None, help="budget preset (default: the study's default scale)")
        s.add_argument("--storage", default=os.environ.get("REGTUNE_STORAGE", "regtune_results"),
                       help="results directory or s3://bucket/prefix (default: ./regtune_results or $REGTUNE_STORAGE)")
        if name == "run":
            s.add_argument("--num-samples", type=int, default=None, help="trials per cell")
            s.add_argument("--max-concurrent", type=int, default=None, help="concurrent trials per cell")
            s.add_argument("--mlflow-uri", default=None, help="tracking URI (default: sqlite in the study dir)")
            s.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS or local Ray)")
            s.add_argument("--seed", type=int, default=0, help="seed of the searcher, the scheduler and the trials")
            s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="fix a hyperparameter in every cell (repeatable; VALUE is JSON or a string)")
            s.add_argument("--confirm-seeds", type=int, default=None, metavar="S",
                           help="confirm phase: fresh seeds per confirmed config (default: the scale's, 3; 2 at "
                                "smoke; 0 turns the phase off)")
            s.add_argument("--confirm-top", type=int, default=None, metavar="K",
                           help="confirm phase: the top K full-budget search configs of each cell (default 1)")
    m = sub.add_parser("mlflow", help="an MLflow server over the studies' tracking stores (127.0.0.1 by default)")
    m.add_argument("--storage", default=os.environ.get("REGTUNE_STORAGE", "regtune_results"),
                   help="results directory (default: ./regtune_results or $REGTUNE_STORAGE)")
    m.add_argument("--study", default=None, help="serve this study's store (default: every store, one port each)")
    m.add_argument("--scale", default=None, help="with --study: this scale only")
    m.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    m.add_argument("--port", type=int, default=5000, help="port of the first server (default: 5000)")
    y = sub.add_parser("sync-mlflow", help="backfill a study's MLflow runs from its Parquet tables (server was away)")
    y.add_argument("study")
    y.add_argument("--scale", default=None, help="budget preset (default: the study's default scale)")
    y.add_argument("--storage", default=os.environ.get("REGTUNE_STORAGE", "regtune_results"),
                   help="results directory (default: ./regtune_results or $REGTUNE_STORAGE)")
    y.add_argument("--mlflow-uri", default=None, help="tracking URI (default: sqlite in the study dir)")
    from studies.engine.estimate import add_parser as add_estimate

    add_estimate(sub)  # python -m studies estimate NAME: the study's cost from a short calibration
    t = sub.add_parser("trial", help="train one config in this process, without Ray (for debugging a method)")
    t.add_argument("method")
    t.add_argument("--task", required=True)
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a hyperparameter (repeatable; VALUE is JSON or a string)")
    return p


def parse_overrides(items: list[str]) -> dict:
    """``["lr=1e-3", "kappa_init_method=warm_start", "betas=[0.9,0.98]"]`` -> a dict (JSON values, else strings)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r} is not allowed: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_trial(method: str, task: str, overrides: dict) -> None:
    from regtune.loop import Run

    run = Run(method, {"task": task, **overrides}, log=print)
    print(f"[{method}] on {task}: " + ", ".join(f"{k}={v}" for k, v in sorted(run.config.items())))
    for r in run.reports():
        shown = {k: v for k, v in r.items() if k.startswith(("train/", "val/", "test/")) or k == "diverged"}
        print(f"step {r['step']:>7d}  " + "  ".join(f"{k} {v:.4g}" for k, v in shown.items()), flush=True)


def _positive(name: str, value, low: int) -> None:
    if value is not None and value < low:
        raise ConfigError(f"{name}={value!r} is not allowed: expected an integer >= {low}")


def cmd_list() -> None:
    from studies import get_study, study_names
    from studies.spec import confirm_seeds

    for name in study_names():
        st = get_study(name)
        print(f"{name:24s} {st.doc}")
        for scale, sc in st.scales.items():
            mark = "*" if scale == st.default_scale else " "
            print(f"  {mark} --scale {scale:8s} {sc.num_samples:3d} trials/cell + {confirm_seeds(st, scale)} confirm seeds"
                  f"  {sc.doc}")


def cmd_methods() -> None:
    from regtune.methods import get_method, method_names

    for name in method_names():
        m = get_method(name)
        print(f"{name:16s} {m.doc}  [{m.paper}]")
        if m.parts:
            print(f"    composed of: {' + '.join(m.parts)}")
        for h in m.hparams:
            print(f"    {h.name:22s} default {h.default!r:14s} {h.doc}; {h.allowed()}")


def cmd_tasks() -> None:
    from regtune.tasks import get_task, task_names

    for name in task_names():
        t = get_task(name)
        print(f"{name:26s} {t.doc} (sizes: {', '.join(t.sizes)}; metric {t.metric})")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from studies.engine.guard import restore_ctrl_c

    restore_ctrl_c()  # Ctrl-C stops a long command even when a shell started it with SIGINT ignored
    if argv[:1] == ["prepare"]:  # its own parser (studies.engine.prepare; bad arguments: exit 2)
        from studies.engine.prepare import main as prepare_main

        return prepare_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            cmd_list()
            return 0
        if args.command == "methods":
            cmd_methods()
            return 0
        if args.command == "tasks":
            cmd_tasks()
            return 0
        if args.command == "trial":
            cmd_trial(args.method, args.task, parse_overrides(args.overrides))
            return 0
        if args.command == "mlflow":
            from studies import get_study
            from studies.engine.mlflow_server import serve

            if args.study:
                get_study(args.study)  # unknown name: one line with suggestions
            _positive("--port", args.port, 1)
            try:
                return serve(args.storage, args.study, args.scale, host=args.host, port=args.port)
            except RuntimeError as e:  # a server that did not start or died
                print(f"error: {e}", file=sys.stderr)
                return 1
        if args.command == "sync-mlflow":
            from studies.engine.mlflow_sync import sync_main

            return sync_main(args.study, args.scale, args.storage, args.mlflow_uri)
        from studies import get_study
        from studies.engine.driver import make_report, run_study, study_dir
        from studies.spec import at_scale, check_study

        study = get_study(args.study)
        scale = args.scale or study.default_scale
        study = at_scale(study, scale)
        overrides = parse_overrides(getattr(args, "overrides", []))
        check_study(study, scale, overrides)
        if args.command == "estimate":
            from studies.engine.estimate import main as estimate_main

            return estimate_main(args, study, scale, overrides)
        if args.command == "report":
            sdir = study_dir(args.storage, study, scale)
            for path in make_report(study, scale, sdir):
                print(path)
            return 0
        _positive("--num-samples", args.num_samples, 1)
        _positive("--max-concurrent", args.max_concurrent, 1)
        _positive("--seed", args.seed, 0)
        _positive("--confirm-seeds", args.confirm_seeds, 0)
        _positive("--confirm-top", args.confirm_top, 1)
        run_study(study, scale, storage=args.storage, num_samples=args.num_samples,
                  max_concurrent=args.max_concurrent, mlflow_uri=args.mlflow_uri, address=args.address,
                  seed=args.seed, overrides=overrides, confirm_seeds=args.confirm_seeds,
                  confirm_top=args.confirm_top)
        return 0
    except ConfigError as e:
        for line in str(e).splitlines():  # one line, or one per item (e.g. each missing data set)
            print(f"error: {line}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the study's state is saved; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
