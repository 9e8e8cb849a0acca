"""
What the example clients share: a registry option and running a coroutine
on the reactor with a client.
"""

import argparse
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react

from skynet.client import Client
from skynet.config import environment_defaults
from skynet.errors import SkynetError


def run(
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    body: Callable[[Client, argparse.Namespace], Awaitable[Any]],
) -> None:
    """
    Parse the command line, make a L{Client} and run C{body} with it.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--registry", help="registry URL (default: $SKYNET_REGISTRY or embedded)")
    add_arguments(parser)
    args = parser.parse_args()

    async def main(reactor: Any) -> None:
        env = environment_defaults()
        client = Client(
            registry=args.registry, reactor=reactor, region=env.region, host=env.bind_ip
        )
        try:
            await body(client, args)
        except SkynetError as e:
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        finally:
            await client.stop()

    react(lambda reactor: ensureDeferred(main(reactor)))
