"""Configurations in the paper's YAML layout (Schedule, Dataset, Model, Train, Optim, Sample)."""

from __future__ import annotations

import os
from importlib import resources

import yaml

from .errors import UserError

SECTIONS = ("Schedule", "Dataset", "Model", "Train", "Optim", "Sample")


def bundled_config_names() -> list[str]:
    """Names of the configurations shipped inside the package, without the .yml suffix."""
    folder = resources.files("pndm_fast") / "configs"
    return sorted(p.name[: -len(".yml")] for p in folder.iterdir() if p.name.endswith(".yml"))


def resolve_config_path(name_or_path: str) -> str:
    """A path to an existing file, or a bundled name in dash or underscore spelling, with or without .yml."""
    if os.path.isfile(name_or_path):
        return name_or_path
    stem = os.path.basename(name_or_path)
    for suffix in (".yml", ".yaml"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    stem = stem.replace("_", "-")
    if stem in bundled_config_names():
        return str(resources.files("pndm_fast") / "configs" / f"{stem}.yml")
    raise UserError(
        f"unknown config {name_or_path!r}: give a YAML file path or one of {', '.join(bundled_config_names())}"
    )


def load_config(name_or_path: str) -> dict:
    """Read a configuration by bundled name or path; it must hold at least Schedule and Model."""
    path = resolve_config_path(name_or_path)
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise UserError(f"config {path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict) or not {"Schedule", "Model"} <= set(config):
        raise UserError(f"config {path} must be a YAML mapping with at least the sections Schedule and Model")
    return config
