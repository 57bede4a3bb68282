"""The optional Prefect integrations that run tasks on a cluster engine (Dask, Ray)."""
from __future__ import annotations

import importlib

ENGINES = ("dask", "ray")


def engine_module(scheme: str, setting: str, error: type[Exception]):
    """``prefect_dask`` or ``prefect_ray``; if it is not installed, ``error`` names the setting
    that asked for it and the package to install."""
    package = f"prefect_{scheme}"
    try:
        return importlib.import_module(package)
    except ImportError:
        raise error(f"{setting} needs the {package.replace('_', '-')} package: "
                    f"pip install {package.replace('_', '-')}") from None
