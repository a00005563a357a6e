"""Airflow sensors and triggers of airflow-glidein (installed as airflow_glidein.sensors)."""

from airflow_glidein.sensors.pilots import PilotsTerminatedSensor

__all__ = ["PilotsTerminatedSensor"]
