"""CLI subcommands for CurveZMQ keys: `keys init-cloud`, `keys new-device`, `keys enrol`, `keys revoke`."""

from __future__ import annotations

import argparse


def add_keys_commands(sub, common: argparse.ArgumentParser) -> None:
    """Register `keys ...` on the top-level subparsers."""
    keys = sub.add_parser("keys", parents=[common], help="CurveZMQ keys of workers and devices")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    p = ksub.add_parser("init-cloud", parents=[common], help="a worker's key pair and empty allow-list in DIR")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=cmd_init_cloud)
    p = ksub.add_parser("new-device", parents=[common], help="a device key pair NAME.key / NAME.key_secret")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the two files (secret one mode 0600)")
    p.set_defaults(func=cmd_new_device)
    for verb, helptext in (("enrol", "allow a device's public key on the worker (no restart needed)"),
                           ("revoke", "remove a device from the worker's allow-list; its sessions are closed")):
        p = ksub.add_parser(verb, parents=[common], help=helptext)
        p.add_argument("name", metavar="NAME")
        p.add_argument("--keys", required=True, metavar="DIR", help="the worker's keys folder (keys init-cloud)")
        if verb == "enrol":
            p.add_argument("--public-key", required=True, metavar="FILE", help="the device's NAME.key")
        p.set_defaults(func=cmd_enrol if verb == "enrol" else cmd_revoke)


def cmd_init_cloud(args: argparse.Namespace) -> int:
    from edgesplit.transport.security import init_cloud

    public = init_cloud(args.dir)
    print(f"{public}  (give this public key to devices as --cloud-key; serve with --keys {args.dir})")
    return 0


def cmd_new_device(args: argparse.Namespace) -> int:
    from edgesplit.transport.security import new_device

    public, secret = new_device(args.name, args.out)
    print(f"{public}  (enrol it on the worker: edgesplit keys enrol {args.name} --public-key {public} --keys DIR)")
    print(f"{secret}  (the device's --device-key; keep it private)")
    return 0


def cmd_enrol(args: argparse.Namespace) -> int:
    from edgesplit.transport.security import enrol

    print(enrol(args.keys, args.name, args.public_key))
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from edgesplit.transport.security import revoke

    print(f"revoked {revoke(args.keys, args.name)}")
    return 0
