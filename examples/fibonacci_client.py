"""
Ask the Fibonacci service for F(n), for each n given.
"""

from examples._common import run


def arguments(parser):
    parser.add_argument("index", nargs="*", type=int, default=[10, 20, 30])


async def body(client, args):
    service = client.service("Fibonacci")
    for index in args.index:
        result = await service.call("Index", {"index": index})
        print(f"F({result['index']}) = {result['value']}")


if __name__ == "__main__":
    run("Call Fibonacci.Index.", arguments, body)
