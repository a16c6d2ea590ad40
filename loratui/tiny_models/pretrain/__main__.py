"""``python -m loratui.tiny_models.pretrain image|text [options]``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the image or text pretraining script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("image", "text"):
        print("usage: python -m loratui.tiny_models.pretrain image|text [--help]", file=sys.stderr)
        return 2
    if args[0] == "image":
        from loratui.tiny_models.pretrain.image import main as run
    else:
        from loratui.tiny_models.pretrain.text import main as run
    return run(args[1:])


if __name__ == "__main__":
    raise SystemExit(main())
