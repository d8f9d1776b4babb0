"""`chatforge experiment smollm2-135m`: run the pipeline as a DVC experiment with a params profile.

A profile (`profiles/<name>.yaml`) holds only the knobs it changes, nested like params.yaml; they become
`dvc exp run -S section.key=value` overrides, so `dvc exp show` lists the experiment beside the workspace's
run and main's params.yaml stays untouched.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

PROFILES = Path("profiles")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("profile", help="a profile name (profiles/<name>.yaml) or a YAML file")
    parser.add_argument("-n", "--name", help="experiment name (default: the profile's name)")
    parser.add_argument("--queue", action="store_true", help="queue it (dvc exp run --queue) instead of running now")
    parser.add_argument("--dry-run", action="store_true", help="print the dvc command and stop")


def overrides(profile: dict, params: dict, prefix: str = "") -> list[str]:
    """Hydra `-S` overrides of a nested mapping, one per leaf (`sft.max_steps=60`), or one per mapping where
    params.yaml has no mapping to descend into (`sft.lora={r:16,alpha:32}` replaces a null)."""
    found = []
    for key, value in profile.items():
        current = params.get(key) if isinstance(params, dict) else None
        if isinstance(value, dict) and isinstance(current, dict):
            found += overrides(value, current, f"{prefix}{key}.")
        else:
            found.append(f"{prefix}{key}={hydra_literal(value)}")
    return found


def hydra_literal(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{hydra_literal(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(hydra_literal(item) for item in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return repr(value)


def load_profile(name: str) -> tuple[str, dict]:
    import yaml

    from chatforge.errors import ChatforgeError

    path = Path(name) if name.endswith((".yaml", ".yml")) else PROFILES / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml"))) or "none"
        raise ChatforgeError(f"{path}: no such profile; profiles are {known}")
    profile = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(profile, dict) or not profile:
        raise ChatforgeError(f"{path}: a profile is a mapping of params.yaml sections to the knobs it changes")
    return path.stem, profile


def run(args: argparse.Namespace) -> None:
    from chatforge.console import console

    from chatforge.params import load_params

    name, profile = load_profile(args.profile)
    command = ["dvc", "exp", "run", "-n", args.name or name] + (["--queue"] if args.queue else [])
    for override in overrides(profile, load_params()):
        command += ["-S", override]
    console.print(shlex.join(command), soft_wrap=True, highlight=False)
    if not args.dry_run:
        sys.exit(subprocess.call(command))
