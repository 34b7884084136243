"""deploy-agent: deploy, find and stop containerised ML services on a GPU node."""

__version__ = "0.1.0"
