"""A SuperNode's node state and object store, used as Flower 1.39's own code uses them, to answer in the SuperNode.

:mod:`fedshield.deploy.node_stages` answers a message in the SuperNode exactly as a ClientApp process would have:
its task claimed, started and finished through the state's own transitions (``claim_task`` is atomic: the SuperExec
and this code never both get a task), the message read with Flower's read that marks it taken, the reply stored
with the helper Flower's loop uses for the replies it makes itself (``_insert_message``), and the context copied and
saved back as the Runtime API's task input and output copy and save it.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from logging import ERROR
from typing import Any

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode, Status, SubStatus
from flwr.common.serde import context_from_proto, context_to_proto
from flwr.supercore.constant import TaskType
from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supernode.start_client_internal import _insert_message

__all__ = ["ClaimingState", "NodeTask", "raised_reply", "stored_message"]


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


class ClaimingState:
    """The node state as Flower's receiving step sees it: once ``shallow`` names the message being received (one
    without arrays), the ClientApp task the step creates for it is claimed at once, so the SuperExec's idle poll
    cannot take it while the message's objects arrive (:meth:`renew` keeps the claim alive meanwhile);
    :meth:`hand_over` gives it back to a ClientApp. Every other attribute is the state's own."""

    def __init__(self, state: Any, shallow: list[str]) -> None:
        self.state, self._shallow = state, shallow
        self.claimed: int | None = None
        self._token: str | None = None
        self._created: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})

    def create_task(self, *args: Any, **kwargs: Any) -> int | None:
        task_id = self.state.create_task(*args, **kwargs)
        task_type = kwargs.get("task_type", args[0] if args else None)
        if task_id is not None and self._shallow and task_type == TaskType.CLIENT_APP:
            token = self.state.claim_task(task_id)
            if token is not None:
                self.claimed, self._token, self._created = task_id, token, (args, kwargs)
        return task_id

    def renew(self) -> None:
        """Keep the claim alive (a claim lapses after Flower's heartbeat interval, 30 s, like a ClientApp's)."""
        if self.claimed is not None:
            self.state.acknowledge_task_heartbeat(self.claimed)

    def still_ours(self) -> bool:
        """Whether the claim still holds: if it lapsed (objects slower than the heartbeat interval), whoever holds
        the task now answers it, and this process must neither answer nor hand it over."""
        if self.claimed is None or self._token is None:
            return False
        task = self.state.get_task_by_token(self._token)
        return task is not None and task.task_id == self.claimed and task.status.status == Status.STARTING

    def hand_over(self, store: Any, message_id: str) -> None:
        """The claimed task's message goes to a ClientApp after all: the claim ends (failed, with the reason) and a
        fresh pending task takes its place, as if the step had created that one. If no task can be made (Flower's
        own failure: a task ID collision), the message gets an error reply, so the SuperNode's push never waits for
        one that nobody makes."""
        if not self.still_ours():
            self.claimed = None
            return
        self.state.finish_task(self.claimed, sub_status=SubStatus.FAILED, details="fedshield: left to a ClientApp")
        args, kwargs = self._created
        self.claimed = None
        if self.state.create_task(*args, **kwargs) is None and (message := stored_message(store, message_id)):
            reply, _ = raised_reply(message, RuntimeError("the SuperNode could not create a task for this message"))
            _insert_message(reply, self.state, store)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.state, name)


class NodeTask:
    """A ClientApp task of ``run_id`` that this process claimed, run the way a ClientApp process runs one."""

    def __init__(self, state: Any, store: Any, run_id: int, task_id: int) -> None:
        self.state, self.store, self.run_id, self.task_id = state, store, run_id, task_id
        self._started: str | None = None

    def others_running(self, margin_s: float = 0.05) -> bool:
        """Whether another task of the run is starting or running, or finished less than ``margin_s`` ago: the
        ClientApp of the previous message saves the context it changed only when it finishes (its task output,
        after its reply went out), and Flower's handler stores that context just after it marks the task finished.
        Also keeps this task's claim alive while it waits."""
        self.state.acknowledge_task_heartbeat(self.task_id)
        recent = datetime.now(timezone.utc) - timedelta(seconds=margin_s)
        for task in self.state.get_tasks(run_ids=[self.run_id]):
            if task.task_id == self.task_id:
                continue
            if task.status.status in (Status.STARTING, Status.RUNNING):
                return True
            if task.status.status == Status.FINISHED and task.finished_at and _when(task.finished_at) > recent:
                return True
        return False

    def take(self, message_id: str) -> bool:
        """Start the task and take its message with Flower's read, which marks it taken (PullTaskInput, then
        PullMessages); False if the state no longer holds ``message_id`` as the run's next message."""
        if not self.state.activate_task(self.task_id):
            return False
        taken = self.state.get_messages(run_ids=[self.run_id], is_reply=False, limit=1)
        if [m.metadata.message_id for m in taken] != [message_id]:
            return False
        self.state.record_message_processing_start(message_id=message_id)
        self._started = message_id
        return True

    def context(self, series_id: int) -> Context:
        """A copy of the run series' context, as a ClientApp process receives one."""
        stored = self.state.get_run_series_context(series_id)
        if stored is None:
            raise LookupError(f"the node holds no context for run series {series_id}")
        return context_from_proto(context_to_proto(stored))

    def last_resort(self, message: Message, ex: Exception) -> None:
        """After :meth:`finish` itself failed: an error reply at least, so the SuperNode's push does not wait."""
        try:
            reply, _ = raised_reply(message, ex)
            _insert_message(reply, self.state, self.store)
        except Exception as err:  # nothing more this process can do
            from flwr.supercore import log

            log(ERROR, "fedshield: no reply could be stored for message %s (%s: %s); if it was taken, Flower's task "
                "expiry answers it", message.metadata.message_id, type(err).__name__, err)

    def finish(self, message: Message, reply: Message, context: Context | None, series_id: int,
               failure: str | None) -> bool:
        """Finish the task, save ``context`` (as a ClientApp's task output does) and store ``reply`` for the
        SuperNode to push; the received message's objects go, as a ClientApp's confirmation deletes them.

        If the task was already over (its token expired: Flower then stored an error reply to the message it saw
        taken), neither the context nor a second reply is stored. A message never taken gets ``reply`` whatever
        happened, so the SuperNode's push never waits for a reply nobody makes. Returns whether it finished."""
        if self._started is not None:
            self.state.record_message_processing_end(message_id=self._started)
        self.store.delete(message.metadata.message_id)
        status = SubStatus.COMPLETED if failure is None else SubStatus.FAILED
        finished = self.state.finish_task(self.task_id, sub_status=status, details=failure or "")
        if finished and context is not None:
            self.state.set_run_series_context(series_id, context)
        if finished or self._started is None:
            _insert_message(reply, self.state, self.store)
        return finished


def _when(iso: str) -> datetime:
    when = datetime.fromisoformat(iso)
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)
