"""The machinery that runs a study spec: the driver (``driver``), one Tune experiment per stage (``stage``), the
search and confirm phases (``confirm``), MLflow tracking (``tracking``, ``mlflow_server``, ``mlflow_sync``), Parquet
export, the driver lock and leftover cleanup (``guard``), checks before Ray starts (``preflight``,
``preflight_services``, ``provenance``), data preparation (``prepare``), cost estimates and resource requests
(``estimate``, ``scaleout``). The catalog of studies and the CLI live one level up, in ``studies``."""
