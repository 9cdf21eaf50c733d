#!/usr/bin/env python3
"""Build a PEP 503 simple index that holds flowworker at given versions and its dependencies.

The pypi scenario's host installs flowworker from this index, served inside the test container,
so the role's `pypi` install method runs without the internet. The wheels come from the role's
own build_wheelhouse.py, once per version, each from a copy of the worker source whose version
is set to that version (the scenario pins one and upgrades to the next).

`--hold NAME==VERSION` adds that (older) version of a dependency to the index beside the lock's,
and `--constraints-out FILE` writes the lock's versions for the host, with the held ones instead:
installed with those constraints the host must take the held version, which it would not take
without them (the index's newest is the lock's).

Writes OUT/simple/<normalized project name>/<wheels> and the tarball OUT.tar of `simple/`;
prints JSON: the tarball and the flowworker versions in the index.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROLE_FILES = Path(__file__).resolve().parents[3] / 'roles' / 'flowworker_install' / 'files'
sys.path.insert(0, str(ROLE_FILES))
import build_wheelhouse  # noqa: E402  (the role's lock reader)

VERSION_FILE = Path('src', 'flowworker', 'version.py')


def normalize(project: str) -> str:
    """PEP 503 name of a project directory."""
    return re.sub(r'[-_.]+', '-', project).lower()


def publish(wheel: Path, out: Path) -> None:
    """A wheel into its project's directory of the index."""
    project = out / 'simple' / normalize(wheel.name.split('-')[0])
    project.mkdir(parents=True, exist_ok=True)
    shutil.copy2(wheel, project / wheel.name)


def versioned_copy(source: Path, version: str, into: Path) -> Path:
    copy = into / f'source-{version}'
    shutil.copytree(
        source,
        copy,
        ignore=shutil.ignore_patterns('.*', '__pycache__', '*.egg-info', 'build', 'dist', 'tests', 'bench'),
    )
    (copy / VERSION_FILE).write_text(f'VERSION = {version!r}\n')
    return copy


def wheelhouse(source: Path, out: Path, args: argparse.Namespace) -> list[Path]:
    built = subprocess.run(
        [
            sys.executable,
            str(ROLE_FILES / 'build_wheelhouse.py'),
            '--out',
            str(out),
            '--python-version',
            args.python_version,
            '--arch',
            args.arch,
            '--glibc',
            args.glibc,
            '--constraint',
            str(source / 'requirements.lock'),
            str(source),
        ],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return [out / name for name in json.loads(built.stdout)['wheels']]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', required=True, type=Path, help='index directory (replaced)')
    parser.add_argument('--python-version', required=True, help='target python X.Y.Z')
    parser.add_argument('--arch', required=True, help='target machine, e.g. x86_64')
    parser.add_argument('--glibc', default='2.28', help='oldest glibc of the targets')
    parser.add_argument('--source', required=True, type=Path, help='the flowworker source directory')
    parser.add_argument('--hold', action='append', default=[], help='NAME==VERSION of a dependency to add')
    parser.add_argument(
        '--constraints-out', type=Path, help="write the lock's versions, the held ones instead"
    )
    parser.add_argument('versions', nargs='+', help='the flowworker versions to put in the index')
    args = parser.parse_args()

    out: Path = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        for version in args.versions:
            source = versioned_copy(args.source.resolve(), version, Path(tmp))
            for wheel in wheelhouse(source, Path(tmp, f'wheelhouse-{version}'), args):
                publish(wheel, out)
        if args.hold:
            held = Path(tmp, 'held')
            download = ['-m', 'pip', 'download', '--quiet', '--no-deps', '--only-binary=:all:']
            subprocess.run(
                [
                    sys.executable,
                    *download,
                    '--python-version',
                    args.python_version,
                    '-d',
                    str(held),
                    *args.hold,
                ],
                check=True,
                stdout=sys.stderr,
            )
            for wheel in held.glob('*.whl'):
                publish(wheel, out)
    if args.constraints_out:
        environment = build_wheelhouse.target_environment(args.python_version, args.arch)
        versions = {
            name: version
            for name, (version, _) in build_wheelhouse.locked(
                (args.source.resolve() / 'requirements.lock').read_text(), environment
            ).items()
        }
        versions.update(hold.split('==', 1) for hold in args.hold)
        args.constraints_out.write_text(
            ''.join(f'{name}=={version}\n' for name, version in sorted(versions.items()))
        )
    tarball = out.with_suffix('.tar')
    with tarfile.open(tarball, 'w') as tar:
        tar.add(out / 'simple', arcname='simple')
    versions = sorted(w.name.split('-')[1] for w in (out / 'simple' / 'flowworker').glob('*.whl'))
    print(json.dumps({'tarball': str(tarball), 'flowworker': versions}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
