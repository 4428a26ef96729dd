"""The README is a promise: every command and program in it runs as written and shows what it claims.

The test starts a local cluster as `make run` does (`logbroker dev`, on free ports) and runs README.md's
fenced blocks in README order against it. The conventions (what is compared, `...`, the `<!-- readme-test:
... -->` annotations, port rewriting) are described at the top of tests/docs/readme_doc.py. Not run:
- `make ...` lines (they build the venv and start or test the whole project; the test is part of
  `make test`) and commands that need Docker (tests/deploy covers those where an engine runs);
- indented blocks and ```sh / ```toml / other blocks: reference material (a production `serve` line with
  10.0.0.x addresses, kcat lines); blocks annotated `skip`, each with its reason.
Which blocks ran and which were skipped, and why, is printed at the end of the pytest run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.docs import readme_doc as doc
from tests.support.brokers import REPO_ROOT, wait_until
from tests.support.dev_ports import free_dev_base_port

README = REPO_ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 60.0
COMMAND_TIMEOUT_S = 60.0
BACKGROUND_LINES_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
RETRY_INTERVAL_S = 0.25
NOT_RUN_COMMANDS = re.compile(r"^\s*(make\b|docker\b)")  # see the module docstring
CLEAN_INTERRUPT_EXITS = (0, 130)  # 130: the shell's code for a command ended by Ctrl-C


@dataclass
class DevCluster:
    """`logbroker dev` as `make run` starts it, on the test's ports, its output in a file."""

    data_dir: Path
    base_port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def output_path(self) -> Path:
        return self.data_dir.parent / "dev.out"

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{self.base_port + n}" for n in range(3))

    def output(self) -> str:
        return self.output_path.read_text(errors="replace") if self.output_path.exists() else ""

    def start(self) -> None:
        command = [str(VENV_BIN / "logbroker"), "dev", "--data-dir", str(self.data_dir),
                   "--base-port", str(self.base_port)]
        with open(self.output_path, "wb") as out:
            proc = self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env={**os.environ, "CI": "true"})
        wait_until(lambda: "cluster serving: all 3 brokers up" in self.output() or proc.poll() is not None,
                   START_TIMEOUT_S, "`logbroker dev` to report its cluster serving")
        assert proc.poll() is None, f"`logbroker dev` exited:\n{self.output()}"

    def stop(self) -> None:
        """Ctrl-C, as a user stops `make run`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"`logbroker dev` did not stop on SIGINT:\n{self.output()}") from None


def terminal_signals() -> None:
    """Ctrl-C (SIGINT) in the commands started from here does what it does in a terminal. A test run started as a
    background job of a non-interactive shell inherits SIGINT ignored, and its children would too: Ctrl-C could
    never stop them. A Python handler here (not an ignore) becomes the default action across their exec. Set in
    this process, not in a preexec_fn: forking a process whose gRPC threads run and then running Python before
    exec can deadlock the child (a README worker once hung that way, printing nothing)."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@dataclass
class Background:
    """A command the README runs in a terminal of its own."""

    command: doc.Command
    proc: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def lines(self) -> list[str]:
        return self.stdout.read_text(errors="replace").splitlines()

    def connected(self) -> bool:
        """Has it (or a child: bash may fork) opened a socket? Then it got past start-up and talks to the
        cluster, and Ctrl-C reaches it as it would a user's running command, not half-way through imports."""
        pids = [self.proc.pid]
        for children in Path(f"/proc/{self.proc.pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                pids += [int(p) for p in children.read_text().split()]
        for pid in pids:
            with contextlib.suppress(OSError):
                if any(os.readlink(fd).startswith("socket:") for fd in Path(f"/proc/{pid}/fd").iterdir()):
                    return True
        return False


@dataclass
class Runner:
    """Runs the README's blocks in order, in a shell environment carried from command to command."""

    base_port: int
    work: Path
    env: dict[str, str]
    background: list[Background] = field(default_factory=list)
    report: list[str] = field(default_factory=list)

    # --------------------------------------------------------------------------------------- blocks

    def run_block(self, block: doc.Block) -> None:
        why_not = self.reason_not_run(block)
        if why_not:
            self.report.append(f"skipped {block.name}: {why_not}")
            return
        started = time.monotonic()
        if block.directives.stop_background_after is not None:
            self.stop_background(block, block.directives.stop_background_after)
        if block.lang == "console":
            ran, not_run = self.run_console(block)
            summary = f"{ran} command(s)" + (f"; not run: {'; '.join(not_run)}" if not_run else "")
        else:
            self.run_python(block)
            summary = "program"
        self.report.append(f"ran {block.name}: {summary} ({time.monotonic() - started:.1f}s)")

    def reason_not_run(self, block: doc.Block) -> str | None:
        if block.directives.skip:
            return block.directives.skip
        if block.lang not in ("console", "python"):
            return "reference material (only ```console and ```python blocks run)"
        missing = [tool for tool in block.directives.needs if shutil.which(tool, path=self.env["PATH"]) is None]
        if missing:
            return f"needs {', '.join(missing)}, not installed here"
        return None

    def run_console(self, block: doc.Block) -> tuple[int, list[str]]:
        ran, not_run = 0, []
        for number, command in enumerate(doc.parse_console(block), 1):
            if number in block.directives.skip_commands:
                not_run.append(f"`{command.text}` ({block.directives.skip_commands[number]})")
                continue
            if NOT_RUN_COMMANDS.match(command.text):
                not_run.append(f"`{command.text}` (make and Docker commands are not run)")
                continue
            if block.directives.background:
                self.start_background(command, block.directives.background)
            else:
                self.run_command(block, command, block.directives.exits.get(number, 0))
            ran += 1
        return ran, not_run

    def run_python(self, block: doc.Block) -> None:
        program = self.work / f"readme_{block.line}.py"
        program.write_text(doc.rewrite_ports(block.body, self.base_port))
        done = subprocess.run([sys.executable, str(program)], cwd=REPO_ROOT, env=self.env, capture_output=True,
                              text=True, timeout=COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, (f"{block.name} exited with {done.returncode}\nstdout:\n{done.stdout}\n"
                                      f"stderr:\n{done.stderr}")

    # ------------------------------------------------------------------------------------- commands

    def shell(self, command: doc.Command) -> subprocess.CompletedProcess[str]:
        """One command in bash, its exported variables kept for the next (`export LOGBROKER_BOOTSTRAP=...`)."""
        env_file = self.work / "env"
        script = (f"set -o pipefail\n{doc.rewrite_ports(command.text, self.base_port)}\n"
                  f"status=$?\nenv -0 > {env_file}\nexit $status\n")
        done = subprocess.run(["bash", "-c", script], cwd=REPO_ROOT, env=self.env, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL)
        if env_file.exists():
            pairs = (item.split("=", 1) for item in env_file.read_text().split("\0") if "=" in item)
            self.env = {key: value for key, value in pairs if key not in ("status", "_", "SHLVL", "PWD", "OLDPWD")}
            env_file.unlink()
        return done

    def run_command(self, block: doc.Block, command: doc.Command, status: int) -> None:
        expected = [doc.rewrite_ports(line, self.base_port) for line in command.expected]
        deadline = time.monotonic() + block.directives.retry_s if expected else 0.0
        while True:
            done = self.shell(command)
            matches = done.returncode == status and (not expected or doc.lines_match(
                expected, done.stdout.splitlines(), block.directives.vary, block.directives.any_order))
            if matches or time.monotonic() >= deadline:
                break
            time.sleep(RETRY_INTERVAL_S)  # state that settles (commits every 5 s): ask again
        where = f"README.md:{command.line} `$ {command.text}`"
        assert done.returncode == status, (f"{where} exited with {done.returncode}, not {status}\n"
                                           f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}")
        assert matches, (f"{where} printed what the README does not show"
                         + (f" (retried for {block.directives.retry_s:g}s)" if block.directives.retry_s else "")
                         + "\nREADME shows:\n" + "\n".join(expected) + f"\nstdout:\n{done.stdout}"
                         + f"stderr:\n{done.stderr}")

    def start_background(self, command: doc.Command, copies: int) -> None:
        for n in range(copies):
            stem = self.work / f"bg_{command.line}_{n}"
            out, err = stem.with_suffix(".out"), stem.with_suffix(".err")
            with open(out, "wb") as stdout, open(err, "wb") as stderr:
                # Its own session: SIGINT to the group reaches the command as Ctrl-C in its terminal would.
                proc = subprocess.Popen(["bash", "-c", doc.rewrite_ports(command.text, self.base_port)],
                                        cwd=REPO_ROOT, env=self.env, stdout=stdout, stderr=stderr,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            self.background.append(Background(command, proc, out, err))

    def background_lines(self) -> list[str]:
        return [line for job in self.background for line in job.lines()]

    def stop_background(self, block: doc.Block, lines: int) -> None:
        assert self.background, f"{block.name}: `stop background` with nothing running in the background"
        wait_until(lambda: any(j.proc.poll() is not None for j in self.background)
                   or (len(self.background_lines()) >= lines and all(j.connected() for j in self.background)),
                   BACKGROUND_LINES_TIMEOUT_S,
                   f"{lines} lines from the background commands, all running\n{self.describe_jobs()}")
        self.interrupt_background()
        printed = self.background_lines()
        assert len(printed) == lines and len(set(printed)) == lines, (
            f"before {block.name}: the background commands printed {len(printed)} line(s), "
            f"{len(set(printed))} distinct; the README's story needs exactly {lines}, each once\n"
            f"{self.describe_jobs()}")
        self.report.append(f"stopped {len(self.background)} background command(s) with SIGINT after "
                           f"{lines} lines, before {block.name}")
        self.background.clear()

    def interrupt_background(self) -> None:
        for job in self.background:
            if job.proc.poll() is None:
                os.killpg(job.proc.pid, signal.SIGINT)
        for job in self.background:
            try:
                job.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(job.proc.pid, signal.SIGKILL)
                job.proc.wait()
        for job in self.background:
            assert job.proc.returncode in CLEAN_INTERRUPT_EXITS and "Traceback" not in job.stderr.read_text(), (
                f"README.md:{job.command.line} `$ {job.command.text}` did not stop cleanly on Ctrl-C "
                f"(exit {job.proc.returncode})\n{self.describe_jobs()}")

    def describe_jobs(self) -> str:
        return "\n".join(f"-- `{j.command.text}` (exit {j.proc.poll()})\nstdout:\n{j.stdout.read_text()}"
                         f"stderr:\n{j.stderr.read_text()}" for j in self.background)

    def kill_background(self) -> None:
        for job in self.background:
            if job.proc.poll() is None:
                os.killpg(job.proc.pid, signal.SIGKILL)
                job.proc.wait()


@pytest.fixture
def dev_cluster(tmp_path: Path) -> Iterator[DevCluster]:
    cluster = DevCluster(tmp_path / "data", free_dev_base_port())
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_every_readme_block_runs_as_written(dev_cluster: DevCluster, tmp_path: Path) -> None:
    blocks = doc.parse_blocks(README.read_text())
    env = {**os.environ, "CI": "true", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "LOGBROKER_BOOTSTRAP": dev_cluster.bootstrap}
    terminal_signals()
    runner = Runner(dev_cluster.base_port, tmp_path, env)
    doc.REPORT.append(f"README.md against `logbroker dev --base-port {dev_cluster.base_port}`:")
    try:
        for block in blocks:
            runner.run_block(block)
    finally:
        runner.kill_background()
        doc.REPORT.extend(f"  {line}" for line in runner.report)
    assert not runner.background, "background commands the README never stops"


def test_links_in_the_docs_point_at_files_that_exist() -> None:
    top_level = {p.name for p in REPO_ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")} - {"data"}
    missing = []
    for page in [README, *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        name = page.relative_to(REPO_ROOT)
        missing += [f"{name}:{line}: link to {target}" for line, target in doc.relative_links(page)
                    if not (page.parent / target).exists()]
        missing += [f"{name}:{line}: `{target}`" for line, target in doc.repository_paths(page, top_level)
                    if not (REPO_ROOT / target).exists()]
    assert not missing, "links to files that do not exist:\n" + "\n".join(missing)
