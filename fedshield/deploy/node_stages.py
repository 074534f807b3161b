"""A site's SuperNode answers SecAgg+'s key and unmask stages itself, without starting a ClientApp process.

Why: Flower 1.39 starts a ClientApp process for every message a SuperNode receives, and that process asks its
SuperNode for the message, its objects, the context and the app bundle, then pushes the reply and its objects back:
about a dozen HTTP requests, a fork and an exit, per message. SecAgg+'s SETUP, SHARE_KEYS and UNMASK stages are
answered inside ``secaggplus_mod`` (key generation, the roster check, Shamir shares; ~10 ms of work) and never reach
training, so most of their cost was that round trip: in a traced 3-site round, the UNMASK exchange took ~0.45 s
for 10-25 ms of site work (benchmarks/RESULTS.md, deploy_overhead). Here the SuperNode runs the same mods on such a
message in its own process, on the same context, and stores the reply where a ClientApp's reply would go.

What a ClientApp would have done is kept: the message's task is claimed (so the SuperExec never starts a ClientApp
for it), started and finished; the received message's objects are deleted as its confirmation deletes them; the
context is saved back as its task output saves it; an exception becomes the same error reply
(``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``). Anything else is left to a ClientApp, as before:

* a message with arrays (a masked-vector request trains) or with no SecAgg+ stage (:func:`~fedshield.client.app
  .is_node_stage`);
* a run whose app bundle is not a code-free bundle naming the site's own ClientApp
  (:func:`~fedshield.deploy.site_clientapp.verify_fab`): only the code a ClientApp would have run may run here;
* a task the SuperExec already claimed (:meth:`claim_task` is atomic; the loser leaves it to the winner).

``FEDSHIELD_NODE_STAGES=0`` on a site answers every message in a ClientApp (for before/after measurements).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

__all__ = ["NODE_STAGES_ENV", "NodeStageAnswerer", "node_stages_enabled"]

NODE_STAGES_ENV = "FEDSHIELD_NODE_STAGES"
#: How long a stage waits for the previous message's ClientApp to save the context it changed (its task output
#: comes after its reply went out); past it, a ClientApp answers the stage instead, as before.
PREVIOUS_TASK_WAIT_S = 2.0
_BUNDLES_KEPT = 64
_log = logging.getLogger(__name__)


def node_stages_enabled(environ: Any = os.environ) -> bool:
    return environ.get(NODE_STAGES_ENV, "1") != "0"


class NodeStageAnswerer:
    """``answer(state, store, run_id, message_id, task_id)``, called with the message stored whole and its task
    claimed: True when it was answered here (a reply is stored, whatever happened once the message was taken);
    False, having taken nothing, leaves it to a ClientApp."""

    def __init__(self, verify: Callable[[bytes], None] | None = None) -> None:
        from .site_clientapp import verify_fab

        self._verify = verify or verify_fab
        self._bundles: dict[str, bool] = {}  # FAB hash -> whether it names the site's own, code-free ClientApp

    def __call__(self, state: Any, store: Any, run_id: int, message_id: str, task_id: int) -> bool:
        from ..client.app import is_node_stage
        from ..flower_internals.node_state import NodeTask, stored_message

        run = state.get_run(run_id)
        if run is None or not self._own_bundle(state, run.fab_hash):
            return _declined("the run's app bundle is not the site's own code-free one")
        message = stored_message(store, message_id)
        if message is None or not is_node_stage(message):
            return _declined("not a SecAgg+ key or unmask stage")
        task = NodeTask(state, store, run_id, task_id)
        deadline = time.monotonic() + PREVIOUS_TASK_WAIT_S
        while task.others_running():
            if time.monotonic() > deadline:
                return _declined(f"the previous message's ClientApp still runs after {PREVIOUS_TASK_WAIT_S:g} s")
            time.sleep(0.005)
        self._answer(task, message, run.series_id)
        return True

    def _own_bundle(self, state: Any, fab_hash: str) -> bool:
        if fab_hash not in self._bundles:
            fab = state.get_fab(fab_hash)
            if fab is None:
                return False  # not cached: the bundle may be stored later
            try:
                self._verify(fab.content)
                ok = True
            except Exception:  # FabRefused or an unreadable bundle: a ClientApp answers with the refusal
                ok = False
            if len(self._bundles) >= _BUNDLES_KEPT:
                self._bundles.clear()
            self._bundles[fab_hash] = ok
        return self._bundles[fab_hash]

    @staticmethod
    def _answer(task: Any, message: Any, series_id: int) -> None:
        """Once called, a reply is always stored: an exception anywhere becomes the error reply a ClientApp sends
        when its app raises (a message taken and then left without a reply would stall the SuperNode's push)."""
        from ..client.app import answer_node_stage
        from ..flower_internals.node_state import raised_reply

        context, failure = None, None
        try:
            if not task.take(message.metadata.message_id):
                raise RuntimeError("fedshield: the SuperNode could not take its message (its state changed)")
            context = task.context(series_id)
            reply = answer_node_stage(message, context)
        except Exception as ex:
            _log.error("fedshield: the SuperNode's answer to a SecAgg+ stage failed", exc_info=ex)
            reply, failure = raised_reply(message, ex)
        try:
            task.finish(message, reply, context, series_id, failure)
        except Exception as ex:
            _log.error("fedshield: the SuperNode could not store its answer to a SecAgg+ stage", exc_info=ex)
            task.last_resort(message, ex)


def _declined(reason: str) -> bool:
    from ..flower_internals.serverapp import log

    log(logging.INFO, "fedshield: a ClientApp answers this message (%s)", reason)
    return False
