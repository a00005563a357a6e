"""The soak: the deployment topology as local processes on 127.0.0.1 (``python -m tests.soak``)."""
