"""Wait until the server's visual_search model is ready (`make up`); show the server log's tail if not."""

import argparse
import sys
from pathlib import Path

from lookalike_client import LookalikeClient, ServerUnavailableError

parser = argparse.ArgumentParser()
parser.add_argument("--url", default="127.0.0.1:8000", help="the HTTP endpoint, host:port (http:// is optional)")
parser.add_argument("--model", default="visual_search")
parser.add_argument("--timeout", type=float, default=300)
parser.add_argument("--log", default=None, help="server log to show if it never gets ready")
args = parser.parse_args()

url = args.url.removeprefix("http://")
with LookalikeClient(url, protocol="http", timeout_s=2) as client:
    try:
        client.wait_until_ready(args.timeout, args.model)
    except ServerUnavailableError as exc:
        print(exc, file=sys.stderr)
        if args.log and Path(args.log).exists():
            print("".join(Path(args.log).read_text(errors="replace").splitlines(True)[-40:]), file=sys.stderr)
        sys.exit(1)
print(f"{args.model} is ready at {url}")
