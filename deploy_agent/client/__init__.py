"""Python client for deploy-agent: one node (AgentClient) or several (ComputeNodes).

For plain scripts::

    from deploy_agent.client import AgentClient, ComputeNodes
    with AgentClient("http://10.0.0.5:9000") as agent:
        answer = agent.deploy("services/yolo/service.yaml")
    with ComputeNodes.from_env() as nodes:
        with nodes.leased("services/yolo/service.yaml", lease_s=60) as lease:
            print(lease.node, lease.host)      # kept current while held

For asyncio code, AsyncAgentClient and AsyncComputeNodes have the same methods, awaited.
Failures raise AgentRequestError subclasses carrying the agent's code, status and message.
Listings come back typed (Service, Gpu, Event; Lease from leased()), attrs classes.
The token comes from `token`, `token_file`, DEPLOY_AGENT_TOKEN or DEPLOY_AGENT_TOKEN_FILE, and
is sent to every node; with none of them, a loopback URL gets the local agent's token from
its state dir (never another host).
"""

from deploy_agent.client.errors import (
    ERRORS_BY_CODE,
    ERRORS_BY_STATUS,
    STATUS_BY_CODE,
    AgentRequestError,
    AuthError,
    BadAnswer,
    CapacityError,
    ConflictError,
    DeployInterrupted,
    HealthTimeoutError,
    ImageError,
    InvalidRequestError,
    LeaseLost,
    LeaseNotFoundError,
    NodeUncertain,
    NodeUnreachable,
    PlainHttpToken,
    PolicyError,
    PullStalledError,
    ServiceNotFoundError,
    StartError,
    TooManyStreamsError,
    error_from,
    said,
)
from deploy_agent.client.lease import Lease, LeaseCallback
from deploy_agent.client.manifests import Intent, Manifest, deploy_body, load_manifest, requirements
from deploy_agent.client.node import DEFAULT_NODE, NDJSON, AsyncAgentClient, node_url
from deploy_agent.client.nodes import (
    LIVE,
    AsyncComputeNodes,
    already_running_answer,
    discover_nodes,
    nodes_from_env,
)
from deploy_agent.client.results import Answer, Event, Gpu, Service
from deploy_agent.client.sync import AgentClient, ComputeNodes

__all__ = [
    "DEFAULT_NODE", "ERRORS_BY_CODE", "ERRORS_BY_STATUS", "LIVE", "NDJSON", "STATUS_BY_CODE",
    "AgentClient", "AgentRequestError", "Answer", "AsyncAgentClient", "AsyncComputeNodes",
    "AuthError", "BadAnswer", "CapacityError", "ComputeNodes", "ConflictError",
    "DeployInterrupted", "Event", "Gpu", "HealthTimeoutError", "ImageError",
    "Intent", "InvalidRequestError", "Lease", "LeaseCallback", "LeaseLost", "LeaseNotFoundError",
    "Manifest", "NodeUncertain", "NodeUnreachable", "PlainHttpToken", "PolicyError",
    "PullStalledError", "Service", "ServiceNotFoundError", "StartError", "TooManyStreamsError",
    "already_running_answer", "deploy_body", "discover_nodes", "error_from", "load_manifest",
    "node_url", "nodes_from_env", "requirements", "said",
]
