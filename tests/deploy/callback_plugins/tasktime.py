"""Ansible callback used by the deploy tests: after the recap, the slowest tasks and their
total time over all hosts and batches (`TASKTIME  12.34s  role : task`), for slow-run triage."""

import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: tasktime
type: aggregate
short_description: per-task wall time summary (tests only)
description: Prints the slowest tasks of the run after the recap.
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "tasktime"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self._started = None
        self._name = None
        self._totals = {}

    def _close(self):
        if self._started is not None:
            spent = time.monotonic() - self._started
            self._totals[self._name] = self._totals.get(self._name, 0.0) + spent
            self._started = None

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._close()
        self._started, self._name = time.monotonic(), task.get_name()

    def v2_playbook_on_handler_task_start(self, task):
        self.v2_playbook_on_task_start(task, False)

    def v2_playbook_on_play_start(self, play):
        self._close()

    def v2_playbook_on_stats(self, stats):
        self._close()
        for name, spent in sorted(self._totals.items(), key=lambda kv: -kv[1])[:20]:
            self._display.display(f"TASKTIME {spent:7.2f}s  {name}")
