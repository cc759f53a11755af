"""The bench passes random tokens on command lines; a token that starts with '-' once failed CI."""

from bench.procs import reference_args
from bench.relay import parse_args


def test_a_token_starting_with_a_dash_reaches_the_reference_relay_intact() -> None:
    token = "-Xq3_leading-dash-token"
    args = parse_args(reference_args(8123, token))
    assert args.controller_token == token
    assert args.port == 8123
