"""
Call C{Sleeper.Sleep}, optionally asking it to unregister or exit.
"""

from bson.int64 import Int64

from examples._common import run


def arguments(parser):
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--message", default="slept well")
    for flag in ("unregisterhalfwaythrough", "unregisterwhendone", "exitwhendone",
                 "panicwhendone"):  # fmt: skip
        parser.add_argument(f"--{flag}", action="store_true")


async def body(client, args):
    params = {
        "duration": Int64(int(args.seconds * 1e9)),
        "message": args.message,
        "unregisterhalfwaythrough": args.unregisterhalfwaythrough,
        "unregisterwhendone": args.unregisterwhendone,
        "exitwhendone": args.exitwhendone,
        "panicwhendone": args.panicwhendone,
    }
    result = await client.service("Sleeper").call("Sleep", params, timeout=args.seconds + 10)
    print(result["message"])


if __name__ == "__main__":
    run("Call Sleeper.Sleep.", arguments, body)
