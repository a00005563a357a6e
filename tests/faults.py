"""Named fault points for the crash-consistency tests, armed from the test process.

The points are where a crash hurts (``KILL_AFTER_CREATE`` is a real SIGKILL between a create call and
the marking of what it made): before a provider call, after it (the
response is lost before the factory could record the ids it names),
between batches, and before the task's result is recorded. A fault fires once; Airflow's retry then runs clean. Faults patch
the shared hook interface, so they apply to every middleware alike.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from airflow_glidein import pilotdb
from airflow_glidein.hooks.base import PilotHook

POINTS = ("before_call", "after_call", "between_batches", "before_record")
TASKS = ("submit", "reap")


class InjectedFault(RuntimeError):
    pass


@dataclass
class Faults:
    armed: tuple[str, str, int] | None = None  # (task, point, nth call)
    calls: Counter = field(default_factory=Counter)
    fired: list[tuple[str, str, int]] = field(default_factory=list)

    def arm(self, task: str, point: str, nth: int) -> None:
        # "between batches" is a crash before a later call, once an earlier one went through
        self.armed = (task, point, max(nth, 2) if point == "between_batches" else nth)
        self.calls.clear()

    def hit(self, task: str, point: str, n: int | None = None) -> None:
        if self.armed is None:
            return
        a_task, a_point, a_nth = self.armed
        want = "before_call" if a_point == "between_batches" else a_point
        if a_task == task and want == point and (n is None or n == a_nth):
            self.fired.append(self.armed)
            self.armed = None
            raise InjectedFault(f"injected fault: {task} {a_point} #{a_nth}")

    def install(self, monkeypatch) -> Faults:
        real_launch, real_terminate = PilotHook.launch, PilotHook.terminate
        real_update = pilotdb.update_memory
        faults = self

        def launch(hook, spec, record=None):
            faults.calls["launch"] += 1
            n = faults.calls["launch"]
            faults.hit("submit", "before_call", n)
            if faults.armed == ("submit", "after_call", n):  # the provider's answer is lost on its way back
                real_create = hook._create

                def create(spec_, count, tags):
                    hook._log = None  # nothing of the answer reaches the factory's record
                    real_create(spec_, count, tags)
                    faults.hit("submit", "after_call", n)

                hook._create = create
            result = real_launch(hook, spec, record)
            faults.hit("submit", "after_call", n)  # nothing was missing: the launch's own answer is lost
            return result

        def terminate(hook, ids, force=False):
            faults.calls["terminate"] += 1
            n = faults.calls["terminate"]
            faults.hit("reap", "before_call", n)
            real_terminate(hook, ids, force=force)
            faults.hit("reap", "after_call", n)

        def update_memory(*args, **kwargs):
            faults.hit("reap", "before_record")
            return real_update(*args, **kwargs)

        from airflow_glidein.operators.factory import SubmitPilotsOperator

        real_execute = SubmitPilotsOperator.execute

        def submit_execute(op, context):
            result = real_execute(op, context)
            faults.hit("submit", "before_record")
            return result

        monkeypatch.setattr(PilotHook, "launch", launch)
        monkeypatch.setattr(PilotHook, "terminate", terminate)
        monkeypatch.setattr(pilotdb, "update_memory", update_memory)
        monkeypatch.setattr(SubmitPilotsOperator, "execute", submit_execute)
        return self


# A real crash between create and marking: the process running the factory DAG is SIGKILLed right after
# the provider answered a create call (its ids in hand) and before anything recorded or tagged them.
# Run as: python -c KILL_AFTER_CREATE <repo> <logical date>.
KILL_AFTER_CREATE = '''
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from airflow_glidein.hooks.base import PilotHook
real = PilotHook.api_call
def api_call(self, send, what="call", charge=True):
    result = real(self, send, what, charge)
    if what == "run_instances":
        os.kill(os.getpid(), signal.SIGKILL)
    return result
PilotHook.api_call = api_call
import pendulum
from airflow.dag_processing.dagbag import DagBag
dag = DagBag(dag_folder=os.path.join(sys.argv[1], "dags")).get_dag("glidein_factory")
dag.test(logical_date=pendulum.parse(sys.argv[2]), run_after=pendulum.parse(sys.argv[2]))
'''
