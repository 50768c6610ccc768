"""`python -m mtft.router CONFIG.{json,yaml}`: run the router alone (mtft-serve starts it this way)."""

import logging
import sys
from pathlib import Path

import uvicorn

from .app import create_app
from .config import RouterConfig


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python -m mtft.router CONFIG.{json,yaml}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # one line per registry change otherwise
    config = RouterConfig.load(Path(argv[0]))
    # No access log: a line per request is the router's own cost, and /metrics counts them. No proxy
    # headers: nothing reads the client's address, and their middleware is a layer on every request.
    # The loop and HTTP parser are uvicorn's "auto": uvloop and httptools (uvicorn[standard]).
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="warning", access_log=False,
                proxy_headers=False)


if __name__ == "__main__":
    main(sys.argv[1:])
