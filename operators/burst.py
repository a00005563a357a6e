"""The operator behind the glidein_burst DAG: validate the burst's params and plan its request."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowException

from airflow_glidein import burst, report
from airflow_glidein.operators.base import GlideinBaseOperator
from airflow_glidein.operators.frontend import StatusPlanningOperator

if TYPE_CHECKING:
    from airflow.sdk import Context


class PlanBurstOperator(StatusPlanningOperator):
    """Plan a burst's request: its pilots split over the entries that can take them now.

    :param frontend: the burst's frontend (templated, e.g. ``{{ params.frontend }}``).
    :param burst_params: the manual run's params (templated; default: the run's params).
    :param credentials: the frontend's credential selection (SelectCredentialsOperator's XCom).
    Entries without a usable credential or backed off by the factory are left
    out, their share going to the others; with none left, the task fails saying why.
    """

    template_fields: Sequence[str] = ("frontend", "burst_params", "credentials", "config_file")

    def __init__(self, *, frontend: str, credentials: Any, burst_params: dict | None = None, **kwargs: Any) -> None:
        super().__init__(frontend=frontend, credentials=credentials, **kwargs)
        self.burst_params = burst_params

    def execute(self, context: Context) -> dict[str, Any]:
        params = dict(self.burst_params if self.burst_params is not None else context["params"])
        request = burst.plan(self.config, params, self._usable(self._status(context)), context["run_id"])
        self.log.info("Burst %s of frontend %s%s:\n%s", request["burst"], request["frontend"],
                      " (dry run: nothing is published)" if request["dry_run"] else "", report.plan_table(request))
        if not request["entries"]:
            raise AirflowException(f"burst {request['burst']}: no entry can take it: {request['skipped']}")
        return request


class ValidateBurstOperator(GlideinBaseOperator):
    """Fail early, naming every problem, when a burst's params do not fit the configuration."""

    template_fields: Sequence[str] = ("burst_params", "config_file")

    def __init__(self, *, burst_params: dict | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.burst_params = burst_params

    def execute(self, context: Context) -> str:
        params = dict(self.burst_params if self.burst_params is not None else context["params"])
        problems = burst.validate(self.config, params)
        if problems:
            raise AirflowException("invalid burst: " + "; ".join(problems))
        self.log.info("Burst parameters are valid: %s", params)
        return params["frontend"]
