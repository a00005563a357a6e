"""airflow-glidein: pilot-based cloud bursting for HTCondor pools, as an Airflow provider."""

__version__ = "0.1.0"
