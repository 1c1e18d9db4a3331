"""Wait until the server's visual_search model is ready (used by `make demo`)."""

import argparse
import sys
import time
import urllib.request
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--url", default="http://127.0.0.1:8000")
parser.add_argument("--model", default="visual_search")
parser.add_argument("--timeout", type=float, default=300)
parser.add_argument("--log", default=None, help="server log to show if it never gets ready")
args = parser.parse_args()

deadline = time.monotonic() + args.timeout
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(f"{args.url}/v2/models/{args.model}/ready", timeout=2) as response:
            if response.status == 200:
                print(f"{args.model} is ready at {args.url}")
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.5)
print(f"{args.model} not ready at {args.url} after {args.timeout:.0f} s", file=sys.stderr)
if args.log and Path(args.log).exists():
    print("".join(Path(args.log).read_text(errors="replace").splitlines(True)[-40:]), file=sys.stderr)
sys.exit(1)
