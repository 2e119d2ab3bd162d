"""A stand-in for Firecracker's ``jailer``: records its argv in ``$FAKE_FC_LOG``, checks
the chroot layout (``<base>/<exec name>/<id>/root``) and runs ``--exec-file`` with the
arguments after ``--``, mapping absolute paths into the jail root (no real chroot)."""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    args = sys.argv[1:]
    split = args.index("--")
    own, rest = args[:split], args[split + 1 :]
    opts = dict(zip(own[::2], own[1::2], strict=True))
    exec_file = opts["--exec-file"]
    root = os.path.join(
        opts["--chroot-base-dir"], os.path.basename(exec_file), opts["--id"], "root"
    )
    with open(os.environ["FAKE_FC_LOG"], "a") as fh:
        fh.write(json.dumps({"jailer_argv": args, "root": root}) + "\n")
    if not os.path.isdir(root):
        sys.exit(f"jail root {root} missing")
    os.chdir(root)
    os.environ["FAKE_FC_ROOT"] = root
    os.execv(exec_file, [exec_file, *rest])


if __name__ == "__main__":
    main()
