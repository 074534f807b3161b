"""A SuperNode's node state and object store, used the way Flower 1.39's own code uses them, so that
:mod:`fedshield.deploy.node_stages` can answer a message in the SuperNode exactly as a ClientApp process would have:
its task claimed, started and finished through the state's own transitions (``claim_task`` is atomic: the SuperExec
and this code never both get a task), the message read with Flower's read that marks it taken, the reply stored
with the helper Flower's loop uses for the replies it makes itself (``_insert_message``), and the context copied and
saved back as the Runtime API's task input and output copy and save it.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode, Status, SubStatus
from flwr.common.serde import context_from_proto, context_to_proto
from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supernode.start_client_internal import _insert_message

__all__ = ["NodeTask", "raised_reply", "stored_message"]


def stored_message(store: Any, message_id: str) -> Message | None:
    """The message ``message_id``, whole, from a node's object store; None if any of its objects is missing."""
    contents = {}
    for node in iterate_object_tree(store.get_object_tree(message_id)):
        content = store.get(node.object_id)
        if not content:
            return None
        contents[node.object_id] = content
    message = inflate_object_from_contents(message_id, contents, keep_object_contents=False)
    if not isinstance(message, Message):
        return None
    message.metadata.__dict__["_message_id"] = message_id  # as Flower's runtime sets it: a message's own object ID
    return message


def raised_reply(message: Message, ex: Exception) -> tuple[Message, str]:
    """The error reply (and task details) ``flwr-clientapp`` makes when its app raises ``ex``."""
    reason = str(type(ex)) + ":<'" + str(ex) + "'>"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message), reason


class NodeTask:
    """The one pending ClientApp task of ``run_id`` on a node, taken as a ClientApp process takes it."""

    def __init__(self, state: Any, store: Any, run_id: int) -> None:
        self.state, self.store, self.run_id = state, store, run_id
        pending = state.get_tasks(run_ids=[run_id], statuses=[Status.PENDING])
        self.task_id: int | None = pending[0].task_id if len(pending) == 1 else None

    def claim(self) -> bool:
        """Claim the task (False if there is none, or the SuperExec claimed it first)."""
        return self.task_id is not None and self.state.claim_task(self.task_id) is not None

    def take(self, message_id: str) -> bool:
        """Start the claimed task and take its message with Flower's read (which marks it taken); False if the
        state no longer holds ``message_id`` as the run's next message."""
        taken = self.state.get_messages(run_ids=[self.run_id], is_reply=False, limit=1)
        ok = [m.metadata.message_id for m in taken] == [message_id] and self.state.activate_task(self.task_id)
        if ok:
            self.state.record_message_processing_start(message_id=message_id)
        return ok

    def context(self, series_id: int) -> Context:
        """A copy of the run series' context, as a ClientApp process receives one."""
        return context_from_proto(context_to_proto(self.state.get_run_series_context(series_id)))

    def finish(self, message: Message, reply: Message, context: Context, series_id: int, failure: str | None) -> None:
        """Store ``reply`` for the SuperNode to push, drop the received message's objects (as a ClientApp's
        confirmation does), finish the task and save ``context`` (as its task output does)."""
        self.state.record_message_processing_end(message_id=message.metadata.message_id)
        self.store.delete(message.metadata.message_id)
        _insert_message(reply, self.state, self.store)
        status = SubStatus.COMPLETED if failure is None else SubStatus.FAILED
        if self.state.finish_task(self.task_id, sub_status=status, details=failure or ""):
            self.state.set_run_series_context(series_id, context)
