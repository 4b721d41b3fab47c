"""What data a task's trials read, and whether it is there: for the study driver's check before Ray starts
and for ``python -m studies prepare --study``.

A task declares its data sets with ``Task.data(config) -> tuple[Need, ...]`` (the
resolved config gives the data dir, the tokenizer and how many images or tokens
the trials read). ``problem(need)`` looks at the files the way the data set's own
module knows them (``regtune.data.cifar``, ``imagenet``, ``text``): existence, sizes
recorded by ``studies prepare`` and counts, by ``stat`` only, so a paper-scale
study is checked in well under a second. ``command(need)`` is the exact
``python -m studies prepare`` line that makes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CIFAR = ("cifar10", "cifar100")


@dataclass(frozen=True)
class Need:
    """One data set a trial reads. ``data_dir``: the config's value (None: the default data dir).
    ``train`` / ``held_out``: how many training and evaluation items (images, or tokens of one window)."""

    dataset: str  # cifar10 | cifar100 | imagenet | a text corpus (regtune.data.text.CORPORA)
    data_dir: str | None
    train: int = 1
    held_out: int = 1
    tokenizer: str | None = None

    @property
    def label(self) -> str:
        return f"{self.dataset} ({self.tokenizer} tokens)" if self.tokenizer else self.dataset

    @property
    def path(self) -> Path:
        """The directory the trials read."""
        if self.dataset in CIFAR:
            from regtune.data.cifar import SPECS, resolve_data_dir

            return resolve_data_dir(self.data_dir) / SPECS[self.dataset].folder
        if self.dataset == "imagenet":
            from regtune.data.imagenet import resolve_imagenet_dir

            return resolve_imagenet_dir(self.data_dir)
        from regtune.data.text import token_dir

        return token_dir(self.data_dir, self.dataset, self.tokenizer or "gpt2")

    @property
    def key(self) -> tuple[str, str]:
        return self.label, os.path.abspath(self.path)


def problem(need: Need) -> str | None:
    """None when the data set is present and complete for ``need``; else what is wrong, in a few words."""
    if need.dataset in CIFAR:
        from regtune.data import cifar

        return cifar.problem(need.dataset, need.data_dir, train=need.train, test=need.held_out)
    if need.dataset == "imagenet":
        from regtune.data import imagenet

        return imagenet.problem(need.data_dir, train=need.train, val=need.held_out)
    from regtune.data.text import tokens_problem

    return tokens_problem(need.path, tokens=max(need.train, need.held_out))


def command(need: Need) -> str:
    """The ``python -m studies prepare`` line that makes the data set where the trials read it."""
    if need.dataset in CIFAR:
        from regtune.data.cifar import prepare_command, resolve_data_dir

        return prepare_command(need.dataset, resolve_data_dir(need.data_dir))
    if need.dataset == "imagenet":
        from regtune.data.imagenet import prepare_command

        return prepare_command(need.path)
    from regtune.data.text import CORPORA, default_data_dir

    root = Path(need.data_dir).expanduser() if need.data_dir else default_data_dir()
    hint = " (downloads it; --text-dir DIR for local text)" if CORPORA[need.dataset].hub_id else ""
    return f"python -m studies prepare {need.dataset} --tokenizer {need.tokenizer} --data-dir {root}{hint}"


def merge(needs: list[Need]) -> Need:
    """One need for several cells reading the same data set: the largest counts."""
    first = needs[0]
    return Need(first.dataset, first.data_dir, max(n.train for n in needs), max(n.held_out for n in needs),
                first.tokenizer)
