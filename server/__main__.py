"""`python -m tuneforge.server ...` is `tuneforge serve ...` (used where the client's CLI is not on PATH)."""

import argparse
import sys

from tuneforge.server.main import add_arguments, run

parser = argparse.ArgumentParser(prog="python -m tuneforge.server")
add_arguments(parser)
sys.exit(run(parser.parse_args()))
