"""Flower helpers below its public strategy API that fedshield's strategies reuse."""

from __future__ import annotations

from flwr.serverapp.exception import InconsistentMessageReplies as InconsistentMessageReplies
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords as aggregate_metricrecords
from flwr.supercore import log as log

__all__ = ["InconsistentMessageReplies", "aggregate_metricrecords", "log"]
