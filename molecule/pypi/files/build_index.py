#!/usr/bin/env python3
"""Build a PEP 503 simple index that holds flowworker at given versions and its dependencies.

The pypi scenario's host installs flowworker from this index, served inside the test container,
so the role's `pypi` install method runs without the internet. The wheels come from the role's
own build_wheelhouse.py, once per version, each from a copy of the worker source whose version
is set to that version (the scenario pins one and upgrades to the next).

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

ROLE_FILES = Path(__file__).resolve().parents[3] / 'roles' / 'arq_worker' / 'files'
VERSION_FILE = Path('src', 'flowworker', 'version.py')


def normalize(project: str) -> str:
    """PEP 503 name of a project directory."""
    return re.sub(r'[-_.]+', '-', project).lower()


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
    parser.add_argument('versions', nargs='+', help='the flowworker versions to put in the index')
    args = parser.parse_args()

    out: Path = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        for version in args.versions:
            source = versioned_copy(args.source.resolve(), version, Path(tmp))
            for wheel in wheelhouse(source, Path(tmp, f'wheelhouse-{version}'), args):
                project = out / 'simple' / normalize(wheel.name.split('-')[0])
                project.mkdir(parents=True, exist_ok=True)
                shutil.copy2(wheel, project / wheel.name)
    tarball = out.with_suffix('.tar')
    with tarfile.open(tarball, 'w') as tar:
        tar.add(out / 'simple', arcname='simple')
    versions = sorted(w.name.split('-')[1] for w in (out / 'simple' / 'flowworker').glob('*.whl'))
    print(json.dumps({'tarball': str(tarball), 'flowworker': versions}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
