"""What every glidein operator shares: the configuration file and its parsing."""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import cached_property
from typing import Any

from airflow.sdk import BaseOperator

from airflow_glidein.config import Config, get_config


class GlideinBaseOperator(BaseOperator):
    """Base of our operators. ``config_file`` defaults to ``[glidein] config_file``."""

    template_fields: Sequence[str] = ("config_file",)
    ui_color = "#e8f0fe"

    def __init__(self, *, config_file: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config_file = config_file

    @cached_property
    def config(self) -> Config:
        return get_config(self.config_file)

    def now(self) -> float:
        """Wall-clock seconds; the one clock the factory's decisions use."""
        return time.time()
