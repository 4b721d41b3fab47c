"""Dataset loading: real on-disk formats from a data dir; no network unless asked."""
