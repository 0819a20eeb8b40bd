"""Symbol graphs as plain data, and the passes that rewrite them."""
from .ir import Graph, Node, load_graph  # noqa: F401
