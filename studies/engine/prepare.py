"""``python -m studies prepare``: make the data sets the studies read, once, before any study runs.

    python -m studies prepare cifar10|cifar100 [--data-dir D] [--mirror URL | --archive PATH]
    python -m studies prepare imagenet --source DIR [--data-dir D | --out-dir O]
    python -m studies prepare CORPUS [...]            (text: regtune.data.text.prepare_main; CORPUS -h)
    python -m studies prepare --study NAME [--scale S] [--mirror URL] [--source DIR]

CIFAR comes through torchvision's own downloader and checksums (``--mirror``: a
server holding the same archive; ``--archive``: a local copy where there is no
network); ImageNet is an ImageFolder the user provides, checked and indexed; text
corpora are tokenized. Every data set is built under a temporary name and renamed
into place under a lock (``regtune.data.store``), so concurrent prepares of one
data set leave one complete copy. ``--study`` prepares what the study's cells read
at the scale, where its trials read it (the check ``studies run`` does first).
Trials never download. Bad arguments or a data set that cannot be made: one line
each, exit status 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from regtune.data import DataMissing
from regtune.data.check import CIFAR, Need, problem
from regtune.data.text import CORPORA
from regtune.space import ConfigError

NAMES = (*CIFAR, "imagenet")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m studies prepare",
        description="Make a data set once, where the trials read it (atomically, under a lock), or every data set "
                    f"a study needs. Text corpora ({', '.join(CORPORA)}) take their own options: "
                    "python -m studies prepare CORPUS -h.")
    p.add_argument("name", nargs="?", choices=NAMES, help="the data set (or a text corpus, see above)")
    p.add_argument("--study", help="prepare every data set this study's cells read at --scale")
    p.add_argument("--scale", help="with --study: the scale (default: the study's default scale)")
    p.add_argument("--data-dir", help="root of the data dir (default: $REGTUNE_DATA_DIR or ~/.cache/regtune/data)")
    p.add_argument("--mirror", help="CIFAR: base URL of a server holding torchvision's archive "
                                    "(cifar-10-python.tar.gz / cifar-100-python.tar.gz; same checksums)")
    p.add_argument("--archive", help="CIFAR: a local copy of torchvision's archive (md5-checked; no network)")
    p.add_argument("--source", help="ImageNet: your ImageFolder with train/<class>/* and val/<class>/*")
    p.add_argument("--out-dir", help="ImageNet: the root the tasks read (default: <data dir>/imagenet)")
    return p


def prepare_one(name: str, *, data_dir=None, mirror=None, archive=None, source=None, out_dir=None) -> None:
    if name in CIFAR:
        from regtune.data.cifar import prepare_cifar

        prepare_cifar(name, data_dir, mirror=mirror, archive=archive, log=_log)
    else:
        from regtune.data.imagenet import prepare_imagenet

        prepare_imagenet(source, data_dir=data_dir, out_dir=out_dir, log=_log)


def prepare_need(need: Need, *, mirror=None, source=None) -> None:
    """Make one data set a study's cells read, where they read it."""
    if need.dataset in CIFAR:
        prepare_one(need.dataset, data_dir=need.data_dir, mirror=mirror)
    elif need.dataset == "imagenet":
        if source is None and not (need.path / "train").is_dir():
            raise ConfigError(f"imagenet: give --source DIR (your ImageFolder with train/ and val/) to index it for "
                              f"{need.path}")
        prepare_one("imagenet", source=source, out_dir=need.path)
    else:
        from regtune.data.text import prepare

        prepare(need.dataset, data_dir=need.data_dir, tokenizer=need.tokenizer, log=_log)


def prepare_study(name: str, scale: str | None, *, mirror=None, source=None) -> list[str]:
    """Prepare what study ``name`` reads at ``scale``; returns one line per data set that could not be made."""
    from studies import get_study
    from studies.engine.preflight import generated, study_needs
    from studies.spec import at_scale, check_study

    study = get_study(name)
    scale = scale or study.default_scale
    study = at_scale(study, scale)
    check_study(study, scale)
    if generated(study, scale):
        _log(f"{name} --scale {scale} generates its own data when it runs: nothing to prepare")
        return []
    failed = []
    for need, cells in study_needs(study, scale):
        if problem(need) is None:
            _log(f"{need.label}: ready in {need.path}")
            continue
        try:
            prepare_need(need, mirror=mirror, source=source)
        except (ConfigError, DataMissing, OSError, RuntimeError) as e:  # the next data set may still work
            failed.append(f"{need.label} (cells {', '.join(cells)}): {e}")
    return failed


def _log(msg: str) -> None:
    print(msg, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv or [])
    if argv and argv[0] in CORPORA:
        from regtune.data.text import prepare_main

        return prepare_main(argv)
    p = _parser()
    args = p.parse_args(argv)
    if bool(args.name) == bool(args.study):
        p.error("give a data set NAME or --study NAME (one of them)")
    if args.study and (args.data_dir or args.archive or args.out_dir):
        p.error("--study prepares the data where the study's trials read them ($REGTUNE_DATA_DIR): "
                "--data-dir, --archive and --out-dir go with a data set NAME")
    if args.name and args.name not in CIFAR and (args.mirror or args.archive):
        p.error(f"--mirror and --archive are for CIFAR, not {args.name}")
    if args.name in CIFAR and (args.source or args.out_dir):
        p.error(f"--source and --out-dir are for imagenet, not {args.name}")
    try:
        if args.study:
            failed = prepare_study(args.study, args.scale, mirror=args.mirror, source=args.source)
        else:
            prepare_one(args.name, data_dir=args.data_dir, mirror=args.mirror, archive=args.archive,
                        source=args.source, out_dir=args.out_dir)
            failed = []
    except (ConfigError, DataMissing) as e:
        failed = [str(e)]
    for line in failed:
        print(f"error: {line}", flush=True)
    return 2 if failed else 0
