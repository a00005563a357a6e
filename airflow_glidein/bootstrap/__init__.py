"""The bootstrap service (pilots fetch their startup script, exchange their token, return their logs).

``app`` builds the FastAPI app (the plugin mounts it at /glidein; ``python -m
airflow_glidein serve-bootstrap`` runs it alone), ``tokens`` keeps launches and
token bindings in the shared state store, ``keys`` the envelope signing key,
``logs`` the pilot logs in object storage, ``launches`` the factory's side.
"""
