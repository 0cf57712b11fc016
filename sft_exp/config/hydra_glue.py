"""What ties the schema to Hydra: the ConfigStore entry and the resolvers the YAML uses (`${asset:}`, `${claim_dir:}`,
`${run_dirname:}`). Registered by launch.py, and again by a submitit worker when it unpickles a sweep job."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from sft_exp.config.naming import claim_dir, run_dirname
from sft_exp.config.schema import RunConfig, register_asset_resolver


def register_configs() -> None:
    """Register the schema (`run_schema`) in Hydra's ConfigStore and every resolver the YAML uses. Idempotent."""
    register_asset_resolver()
    if not OmegaConf.has_resolver("claim_dir"):  # the default hydra.run.dir: never shared by two runs
        OmegaConf.register_new_resolver("claim_dir", claim_dir)
    if not OmegaConf.has_resolver("run_dirname"):  # sweep run directory names
        OmegaConf.register_new_resolver("run_dirname", run_dirname)
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
