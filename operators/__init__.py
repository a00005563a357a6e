"""Airflow operators of airflow-glidein (installed as airflow_glidein.operators)."""

from airflow_glidein.operators.factory import CollectRequestsOperator, PlanCycleOperator, SubmitPilotsOperator
from airflow_glidein.operators.lifecycle import (
    CycleCheckOperator,
    FactoryReportOperator,
    InventoryOperator,
    ReapPilotsOperator,
)
from airflow_glidein.operators.frontend import (
    PlanPilotsOperator,
    PublishRequestOperator,
    QueryDemandOperator,
    SelectCredentialsOperator,
)

__all__ = [
    "CollectRequestsOperator",
    "CycleCheckOperator",
    "FactoryReportOperator",
    "InventoryOperator",
    "PlanCycleOperator",
    "PlanPilotsOperator",
    "PublishRequestOperator",
    "QueryDemandOperator",
    "ReapPilotsOperator",
    "SelectCredentialsOperator",
    "SubmitPilotsOperator",
]
