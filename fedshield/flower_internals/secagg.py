"""Flower's SecAgg+ building blocks that fedshield's port reuses: not public API in Flower 1.39.

fedshield's client mod (:mod:`fedshield.client.secaggplus`) and server stages
(:mod:`fedshield.strategies._secagg_stages`) follow Flower's protocol byte for byte, so they reuse its state object,
config checks, key agreement, field arithmetic, quantization and the ``FitRes`` compat layer, and replace only
what fedshield does differently (signed keys, CSPRNG masks, its own Shamir).
"""

from __future__ import annotations

from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState as SecAggPlusState
from flwr.client.mod.secure_aggregation.secaggplus_mod import check_configs as check_configs
from flwr.client.mod.secure_aggregation.secaggplus_mod import check_stage as check_stage
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt as decrypt
from flwr.common.secure_aggregation.crypto.symmetric_encryption import encrypt as encrypt
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key as generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine as factor_combine
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_extract as factor_extract
from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_addition as parameters_addition
from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_mod as parameters_mod
from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_multiply as parameters_multiply
from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_subtraction as parameters_subtraction
from flwr.common.secure_aggregation.quantization import dequantize as dequantize
from flwr.common.secure_aggregation.quantization import quantize as quantize
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat as share_keys_plaintext_concat
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_separate as share_keys_plaintext_separate,
)
from flwr.compat.common import recorddict_compat as recorddict_compat
from flwr.supercore.primitives.asymmetric import bytes_to_private_key as bytes_to_private_key
from flwr.supercore.primitives.asymmetric import bytes_to_public_key as bytes_to_public_key
from flwr.supercore.primitives.asymmetric import generate_key_pairs as generate_key_pairs
from flwr.supercore.primitives.asymmetric import private_key_to_bytes as private_key_to_bytes
from flwr.supercore.primitives.asymmetric import public_key_to_bytes as public_key_to_bytes

from .secagg_keys import RECORD_KEY_CONFIGS as RECORD_KEY_CONFIGS
from .secagg_keys import RECORD_KEY_STATE as RECORD_KEY_STATE
from .secagg_keys import Key as Key
from .secagg_keys import Stage as Stage

__all__ = [
    "RECORD_KEY_CONFIGS", "RECORD_KEY_STATE", "Key", "SecAggPlusState", "Stage", "bytes_to_private_key",
    "bytes_to_public_key", "check_configs", "check_stage", "decrypt", "dequantize", "encrypt", "factor_combine",
    "factor_extract", "generate_key_pairs", "generate_shared_key", "parameters_addition", "parameters_mod",
    "parameters_multiply", "parameters_subtraction", "private_key_to_bytes", "public_key_to_bytes", "quantize",
    "recorddict_compat", "share_keys_plaintext_concat", "share_keys_plaintext_separate",
]
