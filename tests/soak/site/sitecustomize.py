"""Test-only start-up hook of the soak's Airflow processes (this folder is on their PYTHONPATH).

Points htcondor2 at the soak's pool stand-in when GLIDEIN_SOAK_POOL_URL is set; nothing else.
"""

import os

if os.environ.get("GLIDEIN_SOAK_POOL_URL"):
    import glidein_soak_condor

    glidein_soak_condor.install()
