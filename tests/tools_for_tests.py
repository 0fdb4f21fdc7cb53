"""Tools registered by the server-mode test (forkllm serve --tools tools_for_tests:TOOLS)."""


def double(x: int) -> int:
    """Twice x."""
    return 2 * x


TOOLS = [double]
