"""`python -m dqa_ext info`: the backend in use (compiled kernels or the reference path), the torch
they were built for, and versions, as JSON. The robustness toolkit is a command of its own: `dqa`,
or `python -m dqa_ext.robust`."""
import json
import os
import sys

USAGE = "usage: python -m dqa_ext info (the robustness toolkit: dqa COMMAND, or python -m dqa_ext.robust COMMAND)"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if argv != ["info"]:
        print(f"python -m dqa_ext: error: {' '.join(argv) or 'no command'}: {USAGE}", file=sys.stderr)
        return 2
    import dqa_ext

    try:
        print(json.dumps(dqa_ext.backend_info(), indent=2, default=str), flush=True)
    except BrokenPipeError:  # the reader left (`python -m dqa_ext info | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
