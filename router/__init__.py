"""The task-prefix router in front of vLLM: OpenAI-compatible, per-task metrics, hot-adding.

Start it with `python -m mtft.router CONFIG` (`mtft-serve` does that for you).
"""

from .app import create_app
from .config import Keys, RouterConfig, RouterOptions
from .errors import APIError
from .table import Route, RouteRequest, RouteTable, route

__all__ = ["APIError", "Keys", "Route", "RouteRequest", "RouteTable", "RouterConfig", "RouterOptions", "create_app",
           "route"]
