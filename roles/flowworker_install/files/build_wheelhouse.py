#!/usr/bin/env python3
"""Build (or reuse) a wheelhouse for one target Python version and architecture.

Run on the controller by the flowworker_install role (delegated to localhost, run once per target
platform).  Local packages (the worker and the team's flow packages) are built with
``pip wheel --no-deps``; their dependencies are downloaded as binary wheels for the target
platform with ``pip download --only-binary=:all:``, so hosts need no compiler and no index.

The wheelhouse is rebuilt only when a source file of a local package changed (a hash of the
sources is kept in ``manifest.json``) or when the target platform differs.  A tarball of the
wheels is written beside them so the role copies one file to each host.

``--extra NAME`` adds an optional extra (e.g. ``monitor``) of the local packages that provide
it, with its dependencies; a name no local package provides is an error.

``--constraint FILE`` (the worker's ``requirements.lock``, written by ``make lock``) pins every
dependency to the version it lists, so two builds of the same sources hold the same wheels. When
it carries hashes, pip checks every file it downloads against them (its hash-checking mode: the
local packages' wheels are given their own hashes), so a dependency the lock does not hold, or a
file whose hash it does not list, fails the build.

Prints one JSON object: changed, id (hash of the wheels), packages (project names of the local
packages, with the extras they were built with: ``flowworker[monitor]``), tarball, wheels.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

SKIP_DIRS = {
    '.git',
    '__pycache__',
    'build',
    'dist',
    '.mypy_cache',
    '.pytest_cache',
    '.ruff_cache',
    '.venv',
    'tests',
}


def left_out(directory: str, names: list[str]) -> set[str]:
    """What neither the source hash nor the build's copy of a source tree takes."""
    return {n for n in names if n in SKIP_DIRS or n.endswith(('.egg-info', '.pyc', '.pyo'))}


def source_hash(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for root in paths:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.endswith('.egg-info'))
            for name in sorted(filenames):
                if name.endswith(('.pyc', '.pyo')):
                    continue
                path = Path(dirpath, name)
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wheels_hash(directory: Path) -> str:
    digest = hashlib.sha256()
    for wheel in sorted(directory.glob('*.whl')):
        digest.update(wheel.name.encode())
        digest.update(bytes.fromhex(sha256(wheel)))
    return digest.hexdigest()[:12]


def project_name(wheel: Path) -> str:
    return wheel.name.split('-')[0].replace('_', '-').lower()


def target_environment(python_version: str, arch: str) -> dict[str, str]:
    parts = ([*python_version.split('.'), '0', '0'])[:3]
    return {
        'implementation_name': 'cpython',
        'implementation_version': '.'.join(parts),
        'os_name': 'posix',
        'platform_machine': arch,
        'platform_python_implementation': 'CPython',
        'platform_system': 'Linux',
        'python_full_version': '.'.join(parts),
        'python_version': '.'.join(parts[:2]),
        'sys_platform': 'linux',
        'extra': '',
    }


def metadata_values(wheel: Path, field: str) -> list[str]:
    """The values of one field (``Requires-Dist``, ``Provides-Extra``) of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith('.dist-info/METADATA'))
        metadata = archive.read(name).decode('utf-8', 'replace')
    return [line.partition(':')[2].strip() for line in metadata.splitlines() if line.startswith(f'{field}:')]


def locked(text: str, environment: dict[str, str]) -> dict[str, tuple[str, list[str]]]:
    """The lock's version and hashes of each package, by normalised name, of the entries whose
    marker holds on the target (a universal lock may list a package once per marker)."""
    entries = re.findall(
        # name==version [; marker] [\], then its hash lines
        r'(?m)^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)[ \t]*(?:;([^\\\n]*))?[^\n]*\n'
        r'((?:[ \t]+--hash=\S+[^\n]*\n?)*)',
        text,
    )
    return {
        canonicalize_name(name): (version, re.findall(r'--hash=\S+', hashes))
        for name, version, marker, hashes in entries
        if not marker.strip() or Marker(marker.strip()).evaluate(environment)
    }


def pinned(
    requirements: list[str], lock: dict[str, tuple[str, list[str]]], constraint: Path | None
) -> list[str]:
    """Each requirement at the lock's version, extras kept, with the lock's hashes. pip's
    hash-checking mode takes no range, and pip skips a constraint whose marker fails on the
    controller though it holds on the target."""
    lines = []
    for text in requirements:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name not in lock:
            raise SystemExit(
                f'{name}: required on the target but not in {constraint}; run make lock '
                '(or point the constraint at a lock that holds it)'
            )
        version, hashes = lock[name]
        if not requirement.specifier.contains(version, prereleases=True):
            raise SystemExit(f'{constraint} has {name}=={version}, but {text} is required: run make lock')
        extras = f'[{",".join(sorted(requirement.extras))}]' if requirement.extras else ''
        lines.append(' '.join([f'{name}{extras}=={version}', *hashes]))
    return lines


def missing_requirements(
    directory: Path, environment: dict[str, str], extras: dict[str, list[str]]
) -> list[str]:
    """Requirements of the wheels in ``directory`` that apply on the target but have no wheel there.

    pip evaluates environment markers against the interpreter it runs on, not against
    --python-version: a dependency such as ``async-timeout; python_full_version < "3.11.3"`` is
    skipped on a 3.11.7 controller for a 3.11.2 host. This closes that gap. ``extras`` maps a
    wheel's file name to the extras it is installed with.
    """
    have = {canonicalize_name(w.name.split('-')[0]) for w in directory.glob('*.whl')}
    missing: list[str] = []
    for wheel in sorted(directory.glob('*.whl')):
        for value in metadata_values(wheel, 'Requires-Dist'):
            requirement = Requirement(value)
            if requirement.marker is not None and not any(
                requirement.marker.evaluate({**environment, 'extra': extra})
                for extra in ['', *extras.get(wheel.name, [])]
            ):
                continue
            if canonicalize_name(requirement.name) not in have:
                requirement.marker = None
                missing.append(str(requirement))
    return sorted(set(missing))


def build(
    out: Path,
    sources: list[Path],
    python_version: str,
    arch: str,
    glibc: str,
    *,
    extras: list[str],
    constraint: Path | None,
) -> dict[str, object]:
    nodot = ''.join(python_version.split('.')[:2])
    major, minor = (int(part) for part in glibc.split('.')[:2])
    # pip does not expand a manylinux tag to older ones: list them all, newest first.
    platforms = [f'manylinux_{major}_{m}_{arch}' for m in range(minor, 4, -1)]
    platforms += [f'manylinux2014_{arch}', f'manylinux2010_{arch}', f'manylinux1_{arch}']
    tmp = Path(tempfile.mkdtemp(prefix='.wheelhouse-', dir=out.parent))
    try:
        local = tmp / 'local'
        # setuptools builds in the source tree (build/, *.egg-info): two runs building the same tree
        # at once (parallel deploys, test scenarios) break each other's build, so each builds a copy
        copies = [
            Path(shutil.copytree(source, tmp / 'sources' / f'{i}-{source.name}', ignore=left_out))
            for i, source in enumerate(sources)
        ]
        # Reproducible wheels: the same sources give the same bytes, hence the same wheelhouse id,
        # so rebuilding unchanged sources never makes the hosts switch versions and restart.
        env = {**os.environ, 'SOURCE_DATE_EPOCH': os.environ.get('SOURCE_DATE_EPOCH', '315532800')}
        subprocess.run(
            [
                sys.executable,
                '-m',
                'pip',
                'wheel',
                '--quiet',
                '--no-deps',
                '-w',
                str(local),
                *map(str, copies),
            ],
            check=True,
            stdout=sys.stderr,
            env=env,
        )
        local_wheels = sorted(local.glob('*.whl'))
        # the extras each local package provides, of those asked for
        chosen = {
            w.name: [e for e in extras if e in metadata_values(w, 'Provides-Extra')] for w in local_wheels
        }
        unknown = set(extras).difference(*chosen.values())
        if unknown:
            raise SystemExit(f'--extra {", ".join(sorted(unknown))}: no local package provides it')
        suffix = {name: f'[{",".join(names)}]' if names else '' for name, names in chosen.items()}

        def download(lines: list[str]) -> None:
            """Binary wheels for the target platform into the wheelhouse, of requirements given as a
            file's lines (where pip's hash-checking mode reads the hash of each)."""
            requirements = local / 'requirements.txt'
            requirements.write_text(''.join(f'{line}\n' for line in lines))
            subprocess.run(
                [
                    sys.executable,
                    '-m',
                    'pip',
                    'download',
                    '--quiet',
                    '--only-binary=:all:',
                    '--python-version',
                    python_version,
                    '--implementation',
                    'cp',
                    '--abi',
                    f'cp{nodot}',
                    *(arg for tag in platforms for arg in ('--platform', tag)),
                    '-d',
                    str(tmp),
                    *(['--constraint', str(constraint)] if constraint else []),
                    '-r',
                    str(requirements),
                ],
                check=True,
                stdout=sys.stderr,
            )
            requirements.unlink()

        environment = target_environment(python_version, arch)
        text = constraint.read_text() if constraint else ''
        hashed = '--hash=' in text
        lock = locked(text, environment)
        # the local wheels, with their own hashes in hash-checking mode
        download(
            [f'{w}{suffix[w.name]}' + (f' --hash=sha256:{sha256(w)}' if hashed else '') for w in local_wheels]
        )
        for wheel in local_wheels:
            shutil.move(str(wheel), tmp / wheel.name)
        for _ in range(10):
            missing = missing_requirements(tmp, environment, chosen)
            if not missing:
                break
            # what the lock holds at its version (all of them in hash-checking mode), the rest as required
            pins = [m for m in missing if hashed or canonicalize_name(Requirement(m).name) in lock]
            download(pinned(pins, lock, constraint) + [m for m in missing if m not in pins])
        local.rmdir()
        return {'packages': sorted(project_name(w) + suffix[w.name] for w in local_wheels), 'tmp': tmp}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', required=True, type=Path, help='wheelhouse directory for this platform')
    parser.add_argument(
        '--python-version',
        required=True,
        help='target python X.Y.Z (markers like python_full_version depend on Z)',
    )
    parser.add_argument('--arch', required=True, help='target machine, e.g. x86_64, aarch64')
    parser.add_argument('--glibc', default='2.28', help='oldest glibc of the targets (manylinux tag)')
    parser.add_argument(
        '--extra',
        action='append',
        default=[],
        help='optional extra of the local packages to include with its dependencies (repeatable)',
    )
    parser.add_argument(
        '--constraint', type=Path, help='pip constraints for the dependencies (the lock file)'
    )
    parser.add_argument('sources', nargs='+', type=Path, help='local package directories')
    args = parser.parse_args()

    sources = [s.resolve() for s in args.sources]
    out: Path = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    key = {
        'sources': {str(s): source_hash([s]) for s in sources},
        'python_version': args.python_version,
        'arch': args.arch,
        'glibc': args.glibc,
        'extras': sorted(args.extra),
        'constraint': args.constraint.read_text() if args.constraint else None,
    }
    # one build at a time per wheelhouse: runs from one controller (two playbooks, or test
    # scenarios side by side) wait for each other, then find it built
    with (out.parent / f'.{out.name}.lock').open('w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest_path = out / 'manifest.json'
        changed = False
        manifest: dict[str, object] = {}
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
        previous_id = manifest.get('id')
        if manifest.get('key') != key or not Path(str(manifest.get('tarball', ''))).is_file():
            built = build(
                out,
                sources,
                args.python_version,
                args.arch,
                args.glibc,
                extras=sorted(args.extra),
                constraint=args.constraint,
            )
            tmp = Path(str(built['tmp']))
            ident = wheels_hash(tmp)
            tarball = out.parent / f'{out.name}-{ident}.tar'
            with tarfile.open(tarball, 'w') as tar:
                for wheel in sorted(tmp.glob('*.whl')):
                    tar.add(wheel, arcname=wheel.name)
            manifest = {
                'key': key,
                'id': ident,
                'packages': built['packages'],
                'tarball': str(tarball),
                'wheels': sorted(w.name for w in tmp.glob('*.whl')),
            }
            (tmp / 'manifest.json').write_text(json.dumps(manifest, indent=2) + '\n')
            if out.exists():
                old = manifest_path.is_file() and json.loads(manifest_path.read_text()).get('tarball')
                shutil.rmtree(out)
                if old and old != str(tarball):
                    Path(old).unlink(missing_ok=True)
            tmp.rename(out)
            # reproducible wheels: unchanged sources rebuild to the same id, which is no change
            changed = ident != previous_id
    print(json.dumps({'changed': changed, **{k: v for k, v in manifest.items() if k != 'key'}}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
