"""``fedshield client`` without the printing: check everything locally, reach the server, run a SuperNode.

A site's client is a Flower SuperNode (``flower-supernode``) that dials the server's Fleet API with TLS and its
node key; for every message it starts a ``flwr-clientapp`` process that imports :mod:`fedshield.client.app`
from this installation and reads the site's data and privacy ledger through the node config built here.

Everything that can be checked on this machine is checked *before* the SuperNode starts, because Flower reports
problems late and tersely (every failure is "exit code 1", the reason only in its log): the CA certificate and
node key (readable, private, the right kind), the data file against the task, the state directory and its
ledger, and then the server itself: a TCP connection with retries and backoff, and a TLS handshake against the
given CA, so a wrong CA or a server name missing from its certificate becomes one sentence with the fix. What only
the server can decide (is this key registered?) is read from the SuperNode's log (Flower code 2004).
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..crypto import NodeCredentials, load_node_credentials
from ..crypto.secagg_auth import load_roster
from ..deploy import DeploymentError, SuperNode, SuperNodeConfig, TomlValue, free_port, start_supernode
from ..deploy.process import parse_address, strip_ansi
from ..deploy.supernode import explain_supernode_failure
from ..errors import ConfigError
from ..flower_internals.logs import ACTIVATION_REFUSED_SHORT, SUPERNODE_CONNECTED
from ..privacy.ledger import LEDGER_FILE, PrivacyLedger
from ..protocol import NODE_HEARTBEAT_S
from ..tasks import get_task
from ..device import resolve_device
from ..client.node_config import ALLOW_PLAIN_UPDATES, DATA_PATH, DEVICE, LABEL_COLUMN, STATE_DIR, TEXT_COLUMN
from ..client.node_config import NODE_KEY, SECAGG_MIN_PEERS, SECAGG_ROSTER, WORKER_SOCKET
from .server_probe import RetryHook, wait_for_server
from ..client.policy import DEFAULT_MAX_EPSILON, SitePolicy, check_ledger_terms, default_delta
from ..client.warm_worker import ClientWorker

__all__ = ["ClientCheck", "ClientOptions", "FedshieldClient", "check_client", "start_client", "wait_for_server"]

_SUPERNODE_NAME = "supernode"
_CONNECTED = SUPERNODE_CONNECTED
_ACTIVATION_REFUSED = ACTIVATION_REFUSED_SHORT
# Flower 1.39 counts a node online until 2 missed heartbeats (HEARTBEAT_PATIENCE x the interval the node announced,
# NODE_HEARTBEAT_S) after the last one, and a node that is still online cannot be activated again (code 2004). The
# server pulls replies every 3 s; a few seconds more make sure it has failed the old node's open message before the
# new one activates.
_STALE_ONLINE_WAIT_S = 2 * NODE_HEARTBEAT_S + 6.0
_RESTART_HINT = (
    "; this state directory's node was connected before, so another SuperNode with this key may still be running "
    "(stop it), or the server was reset and no longer has this key registered"
)


@dataclass(frozen=True)
class ClientOptions:
    """What one site passes to ``fedshield client``.

    ``connect_attempts`` tries to reach the server, waiting ``retry_wait`` seconds after the first failure and
    twice as long after each next one (at most ``max_retry_wait``): a site may start before the server does.
    ``device`` (auto, cpu, cuda[:N]) overrides the server's ``--device`` for this site; None follows the server.
    ``warm_worker`` trains in this process (torch, Opacus and the data loaded once) instead of in each of the
    ClientApp processes Flower starts per message; off only to measure what it saves.
    The site's privacy policy (:mod:`fedshield.client.policy`): ``max_epsilon`` (default
    :data:`~fedshield.client.policy.DEFAULT_MAX_EPSILON`), ``delta`` (default 1e-5, or the largest power of ten below 1/records),
    ``accountant``, ``allow_no_dp``, ``allow_plain_updates``; ``task`` is the only task this site runs.
    """

    server: str
    data: Path
    state_dir: Path
    ca_cert: Path | None = None
    node_key: Path | None = None
    task: str = "digits"
    label_column: str | None = None
    text_column: str | None = None  # text tasks: the column holding each record's text (default "text")
    max_epsilon: float | None = None
    device: str | None = None
    allow_plain_updates: bool = False
    delta: float | None = None
    accountant: str = "prv"
    allow_no_dp: bool = False
    #: Run only this site's installed ClientApp (never code from the run's bundle). False only for our benchmark
    #: that runs a stock Flower app on the same SuperNodes; the CLI has no flag for it.
    site_code_only: bool = True
    insecure: bool = False
    port: int | None = None
    connect_attempts: int = 10
    retry_wait: float = 2.0
    max_retry_wait: float = 60.0
    warm_worker: bool = True
    #: Authorized node public keys (``authorized-nodes.txt``, checked out of band); SecAgg+ peers must sign with one.
    roster: Path | None = None
    secagg_min_peers: int = 2
    min_honest: int = 0  # distributed DP: refuse rounds whose noise shares assume fewer honest sites

    def __post_init__(self) -> None:
        try:
            parse_address(self.server)
        except DeploymentError:
            raise ConfigError(f"--server must be HOST:PORT of `fedshield server --address`, got {self.server!r}: "
                              "e.g. --server fl.example.org:9092") from None
        if self.insecure and (self.ca_cert is not None or self.node_key is not None):
            raise ConfigError("--insecure runs without TLS and node authentication: drop --ca and --node-key, "
                              "or drop --insecure")
        if not self.insecure and (self.ca_cert is None or self.node_key is None):
            missing = " and ".join(f for f, v in (("--ca", self.ca_cert), ("--node-key", self.node_key)) if v is None)
            raise ConfigError(f"{missing} required: the ca.pem and this site's node-N.key from the server's "
                              "`fedshield keys init` (--insecure only for local tests, without TLS)")
        if self.insecure and self.roster is not None:
            raise ConfigError("--insecure has no node key to sign SecAgg+ keys with: drop --roster, or drop --insecure")
        if not self.insecure and self.roster is None:
            raise ConfigError("--roster required: the authorized-nodes.txt your coordinator sent (compare its "
                              "fingerprints with the other sites: `fedshield keys fingerprints`); SecAgg+ keys are "
                              "checked against it (--insecure only for local tests, without it)")
        if isinstance(self.secagg_min_peers, bool) or self.secagg_min_peers < 1:
            raise ConfigError(f"--secagg-min-peers must be >= 1, got {self.secagg_min_peers}: e.g. 2")
        if self.max_epsilon is not None and not (self.max_epsilon > 0 and math.isfinite(self.max_epsilon)):
            raise ConfigError(f"--max-epsilon must be a finite number > 0, got {self.max_epsilon}: e.g. --max-epsilon 10")
        if self.port is not None and not 0 < self.port < 65536:
            raise ConfigError(f"--port must be a TCP port in 1..65535 for this site's local SuperNode API, got "
                              f"{self.port} (it is not the server's port; omit it to use any free port)")
        if isinstance(self.connect_attempts, bool) or self.connect_attempts < 1:
            raise ConfigError(f"--connect-attempts must be >= 1, got {self.connect_attempts}")
        if not (self.retry_wait >= 0 and self.max_retry_wait >= 0):
            raise ConfigError(f"--retry-wait must be >= 0 seconds, got {self.retry_wait}")


@dataclass(frozen=True)
class ClientCheck:
    """The outcome of the local checks: what the SuperNode will be given, and what the site should know."""

    host: str
    port: int
    credentials: NodeCredentials | None
    train_examples: int
    test_examples: int
    ledger: PrivacyLedger | None
    node_config: dict[str, TomlValue]
    warnings: tuple[str, ...] = field(default=())
    device: str = "cpu"
    policy: SitePolicy | None = None


def check_client(options: ClientOptions) -> ClientCheck:
    """Check keys, data, state directory and ledger; raise a fedshield error naming the problem and the fix."""
    credentials = None
    if not options.insecure:
        credentials = load_node_credentials(ca_cert=Path(options.ca_cert), private_key=Path(options.node_key))  # type: ignore[arg-type]
    data = Path(options.data).expanduser().resolve()
    state = _state_dir(Path(options.state_dir))
    train, test = _load_data(options.task, data, options.label_column, state, options.text_column)
    policy = SitePolicy(
        task=options.task, max_epsilon=options.max_epsilon or DEFAULT_MAX_EPSILON,
        delta=options.delta if options.delta is not None else default_delta(train + test),
        accountant=options.accountant, allow_no_dp=options.allow_no_dp, min_honest=options.min_honest,
    )
    if policy.delta >= 1.0 / (train + test):
        raise ConfigError(f"--delta {policy.delta:g} is not below 1/records (1/{train + test}): a mechanism that "
                          "publishes one record whole would meet it; choose e.g. --delta 1e-5, or omit it")
    ledger = _ledger(state)
    check_ledger_terms(ledger, policy, state / LEDGER_FILE)
    warnings: list[str] = []
    if ledger is not None and ledger.epsilon >= policy.max_epsilon:
        warnings.append(
            f"this site has already spent epsilon {ledger.epsilon:.3f} (ledger {state / LEDGER_FILE}), at or above "
            f"--max-epsilon {policy.max_epsilon:g}: it will refuse every training round"
        )
    host, port = parse_address(options.server)
    node_config: dict[str, TomlValue] = {
        DATA_PATH: str(data),
        STATE_DIR: str(state),
        LABEL_COLUMN: options.label_column or "",
        ALLOW_PLAIN_UPDATES: bool(options.allow_plain_updates),
        **policy.to_node_config(),
    }
    if options.roster is not None:  # this site signs its SecAgg+ keys and checks its peers' (secaggplus.py)
        roster = Path(options.roster).expanduser().resolve()
        load_roster(roster)  # fail here, not in the first round
        node_config[SECAGG_ROSTER] = str(roster)
        node_config[SECAGG_MIN_PEERS] = int(options.secagg_min_peers)
        if options.node_key is not None:
            node_config[NODE_KEY] = str(Path(options.node_key).expanduser().resolve())
    if options.text_column:  # text tasks: the column the ClientApp tokenises
        node_config[TEXT_COLUMN] = options.text_column
    if options.device is not None:  # the site's choice overrides the run's --device
        node_config[DEVICE] = options.device
    device = str(resolve_device(options.device or "auto"))  # "cuda" without a GPU fails here, with the fix
    return ClientCheck(host, port, credentials, train, test, ledger, node_config, tuple(warnings), device, policy)


def _load_data(task_name: str, data: Path, label_column: str | None, state: Path,
               text_column: str | None = None) -> tuple[int, int]:
    """Load the data exactly as the ClientApp will (same function, same split), so what passes here trains there.
    On a first start this chooses the site's own train/test split and saves it in the state directory."""
    from ..client.site import load_site_files

    get_task(task_name)  # an unknown task fails here, listing the known ones
    train, test = load_site_files(task_name, str(data), label_column or "", str(state), text_column or "")
    return len(train), len(test)



def _state_dir(state: Path) -> Path:
    state = state.expanduser().resolve()
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the state directory {state} ({err.strerror}); choose another --state") from None
    if not os.access(state, os.W_OK | os.X_OK):
        raise ConfigError(f"the state directory {state} is not writable; the privacy ledger lives there: fix its "
                          "permissions or choose another --state")
    return state


def _ledger(state: Path) -> PrivacyLedger | None:
    path = state / LEDGER_FILE
    return PrivacyLedger.load(path) if path.exists() else None



class FedshieldClient:
    """A SuperNode the server accepted; it serves rounds until stopped or until it exits.

    With a warm worker, the training happens in this process (``worker``), on behalf of the SuperNode's
    per-message ClientApp processes.
    """

    def __init__(self, supernode: SuperNode, check: ClientCheck, worker: ClientWorker | None = None) -> None:
        self.supernode = supernode
        self.check = check
        self.worker = worker

    @property
    def node_id(self) -> int | None:
        return self.supernode.node_id

    @property
    def log_path(self) -> Path:
        return self.supernode.process.log_path

    def ledger(self) -> PrivacyLedger | None:
        """This site's ledger as it is on disk now (the ClientApp updates it before each DP round trains)."""
        return _ledger(Path(str(self.check.node_config[STATE_DIR])))

    def is_running(self) -> bool:
        return self.supernode.process.is_running()

    def failure(self) -> DeploymentError:
        """Why the SuperNode stopped, with the fix when Flower's log says it."""
        process = self.supernode.process
        return DeploymentError(
            f"the SuperNode exited (status {process.returncode}, Flower code {process.flower_exit_code()}): "
            f"{_explain(process.log_text(), self.log_path)}"
        )

    def stop(self, *, grace: float = 10.0) -> None:
        """Stop the SuperNode and the ClientApp processes it started, by PID, then the worker."""
        try:
            self.supernode.stop(grace=grace)
        finally:
            if self.worker is not None:
                self.worker.close()

    def __enter__(self) -> FedshieldClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_client(
    options: ClientOptions,
    *,
    check: ClientCheck | None = None,
    on_retry: RetryHook | None = None,
    connect_timeout: float = 60.0,
) -> FedshieldClient:
    """Check (unless given), reach the server, start the SuperNode and return once the server accepted it.

    Raises :class:`DeploymentError` in one line when the server stays unreachable, its certificate does not
    verify, or it refuses this node's key.
    """
    check = check if check is not None else check_client(options)
    wait_for_server(
        check.host, check.port, ca_cert=None if options.insecure else Path(options.ca_cert),  # type: ignore[arg-type]
        attempts=options.connect_attempts, retry_wait=options.retry_wait, max_retry_wait=options.max_retry_wait,
        on_retry=on_retry,
    )
    worker = _start_worker(check) if options.warm_worker else None
    node_config = dict(check.node_config)
    if worker is not None:
        node_config[WORKER_SOCKET] = worker.socket_path
    config = SuperNodeConfig(
        run_dir=Path(str(check.node_config[STATE_DIR])),
        superlink=options.server,
        root_certificates=None if options.insecure else Path(options.ca_cert).resolve(),  # type: ignore[arg-type]
        private_key=None if options.insecure else Path(options.node_key).resolve(),  # type: ignore[arg-type]
        insecure=options.insecure,
        node_config=node_config,
        runtime_port=options.port if options.port is not None else free_port(),
        name=_SUPERNODE_NAME,
        site_code_only=options.site_code_only,
    )
    try:
        supernode = _connect_with_restart(config, options, connect_timeout, on_retry)
    except BaseException:
        if worker is not None:
            worker.close()
        raise
    return FedshieldClient(supernode, check, worker)


def _start_worker(check: ClientCheck) -> ClientWorker:
    """The warm worker for this site, with torch and Opacus imported before the first round asks for them."""
    worker = ClientWorker(check.node_config).start()
    try:
        worker.warm_up()
    except BaseException:
        worker.close()
        raise
    return worker


def _connect_with_restart(
    config: SuperNodeConfig, options: ClientOptions, connect_timeout: float, on_retry: RetryHook | None
) -> SuperNode:
    restarted = _connected_before(config.run_dir / f"{_SUPERNODE_NAME}.log")
    try:
        try:
            supernode = _connect(config, connect_timeout)
        except _Refused as refused:
            if not (restarted and _ACTIVATION_REFUSED in str(refused)):
                raise
            # This state directory's node was connected before: most likely it crashed moments ago and the server
            # still counts it online. Wait until the server must have noticed (and failed the round's message to
            # the old node), then activate: activating earlier could strand that message and hang the round.
            if on_retry is not None:
                on_retry(1, 2, _STALE_ONLINE_WAIT_S, "the server still lists this node online from before it stopped")
            time.sleep(_STALE_ONLINE_WAIT_S)
            supernode = _connect(config, connect_timeout)
    except _Refused as refused:
        hint = _RESTART_HINT if restarted and _ACTIVATION_REFUSED in str(refused) else ""
        raise DeploymentError(f"the server at {options.server} did not accept this client: {refused}{hint}") from None
    return supernode


class _Refused(Exception):
    """The SuperNode exited or never connected; the message is Flower's reason, explained."""


def _connect(config: SuperNodeConfig, timeout: float) -> SuperNode:
    """A SuperNode the server accepted; :class:`_Refused` (process stopped) with the reason if it did not."""
    supernode = start_supernode(config, wait=False)
    try:
        supernode.wait_connected(timeout=timeout)
    except DeploymentError:
        supernode.stop(grace=5.0)
        raise _Refused(_explain(supernode.process.log_text(), supernode.process.log_path)) from None
    except BaseException:
        supernode.stop(grace=5.0)
        raise
    return supernode


def _connected_before(log_path: Path) -> bool:
    """Whether a SuperNode run from this state directory was accepted by a server before (its log says so)."""
    try:
        return re.search(_CONNECTED, strip_ansi(log_path.read_text(errors="replace"))) is not None
    except OSError:
        return False


def _explain(log: str, log_path: Path) -> str:
    reason = explain_supernode_failure(log)
    if reason == "see the log below.":
        return f"see the SuperNode log {log_path}"
    return f"{reason} (SuperNode log: {log_path})"
