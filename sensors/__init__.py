"""Airflow sensors and triggers of airflow-glidein (installed as airflow_glidein.sensors)."""
