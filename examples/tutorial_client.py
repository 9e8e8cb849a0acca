"""
Call C{TutorialService.AddOne} (version 1, region Development) a few times.
"""

from examples._common import run


def arguments(parser):
    parser.add_argument("--value", type=int, default=1)
    parser.add_argument("--times", type=int, default=5)


async def body(client, args):
    service = client.service("TutorialService", version="1", region="Development")
    value = args.value
    for _ in range(args.times):
        result = await service.call("AddOne", {"value": value})
        print(f"AddOne({value}) = {result['value']}")
        value = result["value"]


if __name__ == "__main__":
    run("Call TutorialService.AddOne.", arguments, body)
