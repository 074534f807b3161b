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
from collections.abc import Callable
from typing import Any

__all__ = ["NODE_STAGES_ENV", "NodeStageAnswerer", "node_stages_enabled"]

NODE_STAGES_ENV = "FEDSHIELD_NODE_STAGES"
_log = logging.getLogger(__name__)


def node_stages_enabled(environ: Any = os.environ) -> bool:
    return environ.get(NODE_STAGES_ENV, "1") != "0"


class NodeStageAnswerer:
    """``answer(state, store, run_id, message_id)``: True when the message just received (all its objects stored)
    was answered here; False leaves it to a ClientApp."""

    def __init__(self, verify: Callable[[bytes], None] | None = None) -> None:
        from .site_clientapp import verify_fab

        self._verify = verify or verify_fab
        self._bundles: dict[str, bool] = {}  # FAB hash -> whether it names the site's own, code-free ClientApp

    def __call__(self, state: Any, store: Any, run_id: int, message_id: str) -> bool:
        from ..client.app import is_node_stage
        from ..flower_internals.node_state import NodeTask, stored_message

        run = state.get_run(run_id)
        if run is None or not self._own_bundle(state, run.fab_hash):
            return False
        task = NodeTask(state, store, run_id)
        message = stored_message(store, message_id)
        if task.task_id is None or message is None or not is_node_stage(message) or not task.claim():
            return False  # not ours to answer, or the SuperExec took the task first: a ClientApp answers
        unexpected = None if task.take(message_id) else "the node's state no longer holds it as the next message"
        self._answer(task, message, run.series_id, unexpected)
        return True

    def _own_bundle(self, state: Any, fab_hash: str) -> bool:
        if fab_hash not in self._bundles:
            fab = state.get_fab(fab_hash)
            try:
                ok = fab is not None and self._verify(fab.content) is None
            except Exception:  # FabRefused or an unreadable bundle: a ClientApp answers with the refusal
                ok = False
            self._bundles[fab_hash] = ok
        return self._bundles[fab_hash]

    @staticmethod
    def _answer(task: Any, message: Any, series_id: int, unexpected: str | None) -> None:
        from ..client.app import answer_node_stage
        from ..flower_internals.node_state import raised_reply

        context = task.context(series_id)
        failure = None
        try:
            if unexpected is not None:
                raise RuntimeError(f"fedshield: the SuperNode could not take its message ({unexpected})")
            reply = answer_node_stage(message, context)
        except Exception as ex:  # as flwr-clientapp turns a raising app into an error reply
            _log.error("fedshield: the SuperNode's answer to a SecAgg+ stage raised", exc_info=ex)
            reply, failure = raised_reply(message, ex)
        task.finish(message, reply, context, series_id, failure)
