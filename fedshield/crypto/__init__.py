"""Key material for fedshield: TLS certificates and SuperNode authentication keys (``cryptography`` only)."""

from fedshield.crypto.key_files import AUTHORIZED_NODES as AUTHORIZED_NODES
from fedshield.crypto.key_files import CA_CERT as CA_CERT
from fedshield.crypto.key_files import CA_KEY as CA_KEY
from fedshield.crypto.key_files import SERVER_CERT as SERVER_CERT
from fedshield.crypto.key_files import SERVER_KEY as SERVER_KEY
from fedshield.crypto.key_files import KeySet as KeySet
from fedshield.crypto.key_files import NodeCredentials as NodeCredentials
from fedshield.crypto.key_files import NodeKey as NodeKey
from fedshield.crypto.keys import add_node as add_node
from fedshield.crypto.keys import init_keys as init_keys
from fedshield.crypto.key_loading import load_keyset as load_keyset
from fedshield.crypto.key_loading import load_node_credentials as load_node_credentials
from fedshield.crypto.node_removal import remove_node as remove_node
from fedshield.crypto.key_loading import load_node_key as load_node_key
from fedshield.crypto.site_keys import add_site_public_key as add_site_public_key
from fedshield.crypto.site_keys import make_site_key as make_site_key

__all__ = [
    "AUTHORIZED_NODES",
    "CA_CERT",
    "CA_KEY",
    "SERVER_CERT",
    "SERVER_KEY",
    "KeySet",
    "NodeCredentials",
    "NodeKey",
    "add_node",
    "add_site_public_key",
    "init_keys",
    "load_keyset",
    "load_node_credentials",
    "remove_node",
    "load_node_key",
    "make_site_key",
]
