"""One hook per middleware behind one small interface (see base.PilotHook)."""

from __future__ import annotations

from airflow_glidein.hooks.base import LaunchSpec, PilotHook, pilot_hook

__all__ = ["LaunchSpec", "PilotHook", "pilot_hook"]
