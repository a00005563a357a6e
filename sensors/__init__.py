"""Airflow sensors and triggers of airflow-glidein (installed as airflow_glidein.sensors)."""

from airflow_glidein.sensors.idle_jobs import IdleJobsSensor
from airflow_glidein.sensors.pilots import PilotsTerminatedSensor
from airflow_glidein.sensors.registered import PilotsRegisteredSensor

__all__ = ["IdleJobsSensor", "PilotsRegisteredSensor", "PilotsTerminatedSensor"]
