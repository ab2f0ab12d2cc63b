"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s bench`, `nox -s demo`."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The default (fast) test suite; pass `-- -m slow` for the slow tests."""
    session.install(".[test]")
    session.run("pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the package, plugins, tests and benchmarks."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", "qpmcli", "plugins", "tests", "benchmarks", "noxfile.py")


@nox.session
def bench(session: nox.Session) -> None:
    """Run every benchmark and write benchmarks/results/RESULTS.md and results.json (ratios, machine, date)."""
    session.install(".[test]")
    session.run("python", "benchmarks/run_all.py", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The whole product on embedded data (`qpm demo`)."""
    session.install(".")
    session.run("qpm", "demo", "--out", "qpm-demo", *session.posargs)
