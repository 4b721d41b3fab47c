"""Dataset loading: real on-disk formats from a data dir. Trials never download: data sets are made once
with ``python -m studies prepare`` (``regtune.data.store`` writes them atomically, under a lock)."""


class DataMissing(FileNotFoundError):
    """A data set a trial reads is missing or incomplete; the message names the ``studies prepare`` command.

    Trials treat it as permanent (``trainables.permanent``): a retry would fail the same way."""
