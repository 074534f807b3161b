"""The SuperNode loop's internals fedshield adjusts (when called, never on import): its ``time`` module (to cap its
sleeps), its message-receiving step (so a run stopped mid-receive leaves nothing behind) and the object-pull backoff
of the SuperNode and of its ClientApp processes.

Why the receiving step: Flower 1.39's ``_pull_and_store_message`` stores a message in the node's state and creates
its ClientApp task *before* it fetches the message's objects from the SuperLink. When the run stops during that
fetch, the SuperLink answers 403, Flower raises ``RunNotRunningException`` -- a ``BaseException`` -- which skips the
``except Exception`` clean-up next to it: the message stays stored with its objects never available, the task stays
live and its token valid. A ClientApp that already pulled the message (a forked one is there within ~0.3 s; a cold
one under load too) then polls those objects with Flower's backoff for up to 2 hours, its heartbeat keeping the task
alive (reproduced: tests/test_zygote_stop_race.py). Turning the stop into an ordinary failure inside that step lets
Flower's own clean-up run: the message and its objects are deleted and the task is finished, which revokes its
token, so the ClientApp's next request is refused (401) and Flower's client ends the process.
"""

from __future__ import annotations

import functools
import inspect
import time
import warnings
from logging import WARNING
from collections.abc import Callable
from typing import Any

__all__ = [
    "CLIENTAPP_RUNNER",
    "RECEIVE_STEP",
    "SUPERNODE_LOOP",
    "RunStoppedWhileReceiving",
    "cap_supernode_sleeps",
    "fail_receive_on_stopped_run",
    "quicken_object_pulls",
]

#: Flower 1.39's SuperNode loop module; it calls ``time.sleep(3)`` when it pulls and finds no message.
SUPERNODE_LOOP = "flwr.supernode.start_client_internal"
#: The step of that loop that receives one message, and the callables it is given that talk to the SuperLink.
RECEIVE_STEP = "_pull_and_store_message"
_SUPERLINK_CALLS = ("pull_object", "confirm_message_received")
#: The step's other arguments the node-answer hook uses (the received message, the node's state and store).
_NODE_ARGUMENTS = ("receive", "state", "object_store")
#: The module of ``flwr-clientapp`` that pulls the ClientApp's message from the SuperNode.
CLIENTAPP_RUNNER = "flwr.supernode.runtime.run_clientapp"
_WRAPPED = "__fedshield_wrapped__"


class RunStoppedWhileReceiving(Exception):
    """The run stopped while the SuperNode was fetching its message: an ordinary failure, cleaned up by Flower."""


def cap_supernode_sleeps(clock: Any) -> bool:
    """Make the SuperNode loop use ``clock`` as its ``time`` module; False (and a warning) if the loop no longer
    uses the ``time`` module as Flower 1.39 did, leaving Flower's own pace."""
    from flwr.supernode import start_client_internal as loop

    if getattr(loop, "time", None) is not time:
        warnings.warn(
            f"fedshield: {SUPERNODE_LOOP} no longer uses the time module as Flower 1.39 did; "
            "the SuperNode runs with Flower's own polling (3 s when idle)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    loop.time = clock
    return True


def fail_receive_on_stopped_run(on_task: Callable[[], None] | None = None,
                                answer: Callable[[Any, Any, int, str, int], bool] | None = None) -> bool:
    """Wrap the loop's receiving step so that a run stopped mid-receive is an ordinary failure (module docstring);
    False (and a warning) if the step no longer looks as in Flower 1.39.

    ``on_task`` is called when a message's ClientApp task exists: at the step's first object fetch (Flower creates
    the task just before) and again when it returns a run (a message was received).

    ``answer(state, object_store, run_id, message_id, task_id)`` may answer a message without arrays in the
    SuperNode itself (:mod:`fedshield.deploy.node_stages`), once all its objects are stored. The task Flower creates
    for such a message is claimed at once (:class:`~.node_state.ClaimingState`: the SuperExec's idle poll cannot
    take it meanwhile), and ``on_task`` is called only if ``answer`` declined, for the fresh pending task that then
    replaces the claimed one."""
    from flwr.supercore.run import RunNotRunningException
    from flwr.supernode import start_client_internal as loop

    step = getattr(loop, RECEIVE_STEP, None)
    if step is not None and getattr(step, _WRAPPED, False):
        return True
    if step is None or not {*_SUPERLINK_CALLS, *_NODE_ARGUMENTS} <= set(inspect.signature(step).parameters):
        warnings.warn(f"fedshield: {SUPERNODE_LOOP}.{RECEIVE_STEP} is not as in Flower 1.39; a run stopped while "
                      "a message is received can leave its ClientApp waiting", RuntimeWarning, stacklevel=2)
        return False
    signature = inspect.signature(step)

    @functools.wraps(step)
    def receive(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        for name in _SUPERLINK_CALLS:
            bound.arguments[name] = _stop_as_failure(bound.arguments[name], RunNotRunningException)
        shallow: list[str] = []  # the received message's ID, when it has no arrays
        claiming = None
        if answer is not None:
            from .node_state import ClaimingState

            bound.arguments["receive"] = _noting_shallow(bound.arguments["receive"], shallow)
            claiming = bound.arguments["state"] = ClaimingState(bound.arguments["state"], shallow)
        bound.arguments["pull_object"] = _hooked_pull(bound.arguments["pull_object"], claiming, on_task, shallow)
        run_id = step(*bound.args, **bound.kwargs)
        if run_id is not None and not _answered(answer, claiming, bound.arguments["object_store"], run_id, shallow):
            if on_task is not None:
                on_task()
        return run_id

    setattr(receive, _WRAPPED, True)
    setattr(loop, RECEIVE_STEP, receive)
    return True


def _noting_shallow(receive: Callable[[], Any], shallow: list[str]) -> Callable[[], Any]:
    """``receive`` that puts in ``shallow`` the ID of a message it returns that has no arrays: its object tree is
    the message, its record dict and leaf records (an array record has arrays below it, each with its chunks)."""

    def noting() -> Any:
        got = receive()
        shallow.clear()
        if got is not None and all(not record.children for record in _children(_children(got[1]))):
            shallow.append(got[1].object_id)
        return got

    return noting


def _children(trees: Any) -> list[Any]:
    items = trees if isinstance(trees, list) else [trees]
    return [child for tree in items for child in tree.children]


def _answered(answer: Callable[[Any, Any, int, str, int], bool] | None, claiming: Any, store: Any, run_id: int,
              shallow: list[str]) -> bool:
    """Whether ``answer`` answered the message whose task ``claiming`` claimed; if it declined, the task is handed
    to a ClientApp. An exception is a decline (the answerer takes nothing before it cannot fail), logged."""
    if answer is None or claiming is None or claiming.claimed is None:
        return False
    if not claiming.still_ours():  # the claim lapsed: whoever holds the task now answers it
        return False
    try:
        if answer(claiming.state, store, run_id, shallow[0], claiming.claimed):
            return True
    except Exception as err:  # never the loop's end: the message's ClientApp answers it instead
        from flwr.supercore import log

        log(WARNING, "fedshield: the SuperNode could not answer a message itself (%s: %s); a ClientApp answers it",
            type(err).__name__, err)
    claiming.hand_over(store, shallow[0])
    return False


def _hooked_pull(pull: Callable[..., Any], claiming: Any, on_task: Callable[[], None] | None,
                 shallow: list[str]) -> Callable[..., Any]:
    """``pull_object`` that keeps the step's claim alive at each object it fetches, and wakes the SuperExec at the
    first one unless the message has no arrays (its task is claimed; it is woken after the step if need be)."""
    if claiming is not None:
        inner = pull

        def renewing(*args: Any, **kwargs: Any) -> Any:
            claiming.renew()
            return inner(*args, **kwargs)

        pull = renewing
    if on_task is not None:
        pull = _first_call_calls(lambda: None if shallow else on_task(), pull)
    return pull


def _first_call_calls(hook: Callable[[], None], call: Callable[..., Any]) -> Callable[..., Any]:
    called = False

    def first(*args: Any, **kwargs: Any) -> Any:
        nonlocal called
        if not called:
            called = True
            hook()
        return call(*args, **kwargs)

    return first


def _stop_as_failure(call: Callable[..., Any], stopped: type[BaseException]) -> Callable[..., Any]:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except stopped:
            raise RunStoppedWhileReceiving("the run stopped while this message was being received") from None

    return guarded


def quicken_object_pulls(module_name: str, attribute: str, *, initial_backoff: float, backoff_cap: float) -> bool:
    """Make ``module_name.attribute`` (``pull_objects`` in the SuperNode loop, ``pull_and_inflate_object_from_tree``
    in the ClientApp runner) retry an object that is not there yet after ``initial_backoff`` s, doubling up to
    ``backoff_cap`` s, instead of Flower's 1 s doubling up to 10 s. Bounded by time (Flower's 2 h) instead of by 500
    tries, so shorter waits never cut the total patience. False (and a warning) if it is not as in Flower 1.39."""
    import importlib

    module = importlib.import_module(module_name)
    pull = getattr(module, attribute, None)
    if pull is not None and getattr(pull, _WRAPPED, False):
        return True
    wanted = {"initial_backoff", "backoff_cap", "max_tries_per_object", "max_time"}
    if pull is None or not wanted <= set(inspect.signature(pull).parameters):
        warnings.warn(f"fedshield: {module_name}.{attribute} is not as in Flower 1.39; its object pulls keep "
                      "Flower's 1-10 s backoff", RuntimeWarning, stacklevel=2)
        return False
    quick = functools.partial(pull, initial_backoff=initial_backoff, backoff_cap=backoff_cap, max_tries_per_object=None)
    setattr(quick, _WRAPPED, True)
    setattr(module, attribute, quick)
    return True
