"""The SecAgg+ record keys and stage names (Flower-internal constants), light enough for the ClientApp shim."""

from __future__ import annotations

from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS as RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE as RECORD_KEY_STATE
from flwr.common.secure_aggregation.secaggplus_constants import Key as Key
from flwr.common.secure_aggregation.secaggplus_constants import Stage as Stage

__all__ = ["RECORD_KEY_CONFIGS", "RECORD_KEY_STATE", "Key", "Stage"]
