"""
Call C{TestService.Upcase}: C{python -m examples.testservice_client hello}.
"""

from examples._common import run


def arguments(parser):
    parser.add_argument("words", nargs="*", default=["hello", "skynet"])


async def body(client, args):
    service = client.service("TestService")
    for word in args.words:
        result = await service.call("Upcase", {"data": word})
        print(f"{word} -> {result['data']}")


if __name__ == "__main__":
    run("Call TestService.Upcase.", arguments, body)
