"""The production stack on 127.0.0.1, for the integration tests and for a person (`make services`):
a throwaway PostgreSQL cluster (Dagster's and MLflow's databases), moto's S3 server, and an MLflow
tracking server on PostgreSQL with its artifacts in S3. Every service listens on 127.0.0.1 on a
free port and is stopped by the pid (process group) this module started.

    python -m tests.services            # start everything, print the settings to export, Ctrl-C stops

A service that cannot start raises ``ServiceError`` with the reason and the tail of its log.

PostgreSQL refuses to run as root, so as root ``initdb`` and ``postgres`` run as the ``postgres``
user (Debian's package creates it; else ``nobody``) through ``setpriv``, which execs in place: the
pid we hold is the server's. Its binaries are found on PATH, else in /usr/lib/postgresql/<ver>/bin
(Debian), else in $PG_BIN.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import dagster as dg

S3_KEY = S3_SECRET = "testing"  # moto accepts any credentials
REGION = "us-east-1"


class ServiceError(RuntimeError):
    """A service did not start (or stop); the message says why and shows its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop_group(proc: Optional[subprocess.Popen], sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Signal the process group we started (the server and any workers it forked), wait, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    with contextlib.suppress(ProcessLookupError):  # workers left behind by a leader that died first
        os.killpg(proc.pid, signal.SIGKILL)


def pg_bin(name: str) -> str:
    """A PostgreSQL server binary: $PG_BIN, PATH, then Debian's /usr/lib/postgresql/<newest>/bin."""
    candidates = []
    if os.environ.get("PG_BIN"):
        candidates.append(Path(os.environ["PG_BIN"]) / name)
    if shutil.which(name):
        candidates.append(Path(shutil.which(name)))
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                      if Path(p).parent.name.isdigit() else 0, reverse=True)
    candidates += [Path(v) / name for v in versions]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise ServiceError(f"PostgreSQL's {name} was not found on PATH, in /usr/lib/postgresql/*/bin or $PG_BIN: "
                       "install it (Debian: apt-get install postgresql; .ci/run does) or set PG_BIN")


class Postgres:
    """A throwaway cluster under ``root``: password auth on 127.0.0.1, a socket only in its folder."""

    def __init__(self, root: Path, port: Optional[int] = None, user: str = "precompute"):
        self.root, self.port, self.user = Path(root), port or free_port(), user
        self.data, self.log = self.root / "data", self.root / "postgres.log"
        self.password = secrets.token_hex(12)
        self.proc: Optional[subprocess.Popen] = None
        self._as_user: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse root
            name = "postgres" if _user_exists("postgres") else "nobody"
            entry = pwd.getpwnam(name)
            self._as_user = [shutil.which("setpriv") or "setpriv", f"--reuid={entry.pw_uid}",
                             f"--regid={entry.pw_gid}", "--init-groups", "--"]
            self._owner = (entry.pw_uid, entry.pw_gid)

    def _run_as(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        if self._as_user:
            os.chown(self.root, *self._owner)

    def initdb(self) -> None:
        self._run_as()
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as_user:
            os.chown(pwfile, *self._owner)
        cmd = self._as_user + [pg_bin("initdb"), "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}",
                               "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-locale"]
        done = subprocess.run(cmd, cwd=self.root, capture_output=True, text=True)
        pwfile.unlink()
        if done.returncode != 0:
            raise ServiceError(f"initdb failed (exit {done.returncode}): {' '.join(cmd)}\n{done.stdout}{done.stderr}")

    def start(self, timeout: float = 60.0) -> "Postgres":
        if not (self.data / "PG_VERSION").exists():
            self.initdb()
        cmd = self._as_user + [pg_bin("postgres"), "-D", str(self.data), "-p", str(self.port),
                               "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}"]
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.root, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.connect("postgres").close()
                return self
            except Exception as exc:  # noqa: BLE001  not up yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise ServiceError(f"PostgreSQL did not start on 127.0.0.1:{self.port} ({exc}); "
                                       f"log {self.log}:\n{_tail(self.log)}") from exc
                time.sleep(0.2)

    def stop(self) -> None:
        """Fast shutdown (SIGINT): clients are disconnected, committed work is flushed."""
        _stop_group(self.proc, signal.SIGINT)

    def connect(self, db: str):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                                dbname=db, connect_timeout=3)

    def create_database(self, name: str) -> None:
        conn = self.connect("postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if not cur.fetchone():
                cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()

    def url(self, db: str, driver: str = "") -> str:
        """A SQLAlchemy URL; ``driver="psycopg2"`` names the DBAPI (SQLAlchemy 2 would pick psycopg 3)."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}:{self.password}@127.0.0.1:{self.port}/{db}"


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _wait_http(url: str, proc: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError as exc:
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop_group(proc)
                state = f"exited with {proc.returncode}" if proc.returncode is not None else f"no answer in {timeout:g}s"
                raise ServiceError(f"{what} did not start ({state}; {url}: {exc}); log {log}:\n{_tail(log)}") from exc
        time.sleep(0.25)


class MotoS3:
    """moto's S3 server as a subprocess."""

    def __init__(self, root: Path, port: Optional[int] = None):
        self.root, self.port = Path(root), port or free_port()
        self.log = self.root / "moto.log"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "MotoS3":
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        _wait_http(f"{self.endpoint}/moto-api/", self.proc, self.log, "moto's S3 server", timeout)
        return self

    def stop(self) -> None:
        _stop_group(self.proc)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def storage_options(self) -> dict:
        """fsspec (s3fs) options for this endpoint."""
        return {"endpoint_url": self.endpoint, "key": S3_KEY, "secret": S3_SECRET}


def aws_env(endpoint: str) -> dict:
    return {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": REGION,
            "MLFLOW_S3_ENDPOINT_URL": endpoint}


class MlflowServer:
    """`mlflow server` with PostgreSQL as its backend store and artifacts proxied to S3."""

    def __init__(self, root: Path, backend_uri: str, artifacts: str, s3_endpoint: str, port: Optional[int] = None):
        self.root, self.backend_uri, self.artifacts, self.s3_endpoint = Path(root), backend_uri, artifacts, s3_endpoint
        self.port = port or free_port()
        self.log = self.root / "mlflow.log"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        mlflow = str(Path(sys.executable).with_name("mlflow"))
        env = {**os.environ, **aws_env(self.s3_endpoint)}
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
            env.pop(name, None)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no GenAI job runners: nothing here uses them
        cmd = [mlflow, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", self.backend_uri, "--serve-artifacts",
               "--artifacts-destination", self.artifacts]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=self.root, start_new_session=True)
        _wait_http(f"{self.url}/health", self.proc, self.log, "the MLflow server", timeout)
        return self

    def stop(self) -> None:
        _stop_group(self.proc)

    def kill(self) -> None:
        """SIGKILL, as a crash: no request it was serving gets an answer."""
        _stop_group(self.proc, signal.SIGKILL)


class Stack:
    """PostgreSQL + moto S3 + the MLflow server, in ``root`` (a new temporary folder by default)."""

    BUCKET = "precompute"

    def __init__(self, root: Optional[Path] = None):
        # not under pytest's tmp_path: as root, PostgreSQL runs as another user that must reach its folder
        self._owns_root = root is None
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="precompute-services-"))
        os.chmod(self.root, 0o755)
        self.postgres = Postgres(self.root / "postgres")
        self.s3 = MotoS3(self.root)
        self.mlflow: Optional[MlflowServer] = None

    def start(self) -> "Stack":
        try:
            self.postgres.start()
            for db in ("dagster", "mlflow"):
                self.postgres.create_database(db)
            self.s3.start()
            self.s3.create_bucket(self.BUCKET)
            self.mlflow = MlflowServer(self.root, self.postgres.url("mlflow", "psycopg2"), f"s3://{self.BUCKET}/mlartifacts",
                                       self.s3.endpoint).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for service in (self.mlflow, self.s3, self.postgres):
            if service is not None:
                service.stop()

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def dagster_yaml(self) -> str:
        """The instance section the tests run and deploy/k8s/dagster.yaml carries: run, event-log and
        schedule storage on PostgreSQL; urllib3's retries (MLflow's HTTP client) in the run's event log."""
        pg = self.postgres
        return f"""storage:
  postgres:
    postgres_db:
      hostname: 127.0.0.1
      port: {pg.port}
      username: {pg.user}
      password: {{env: DAGSTER_PG_PASSWORD}}
      db_name: dagster
      scheme: postgresql+psycopg2   # SQLAlchemy 2.1 would pick psycopg 3 for plain postgresql://
python_logs:
  managed_python_loggers: [urllib3.util.retry, urllib3.connectionpool]
telemetry:
  enabled: false
"""

    def write_dagster_home(self, home: Path) -> Path:
        home = Path(home)
        home.mkdir(parents=True, exist_ok=True)
        (home / "dagster.yaml").write_text(self.dagster_yaml())
        return home

    def settings(self, dagster_home: Path) -> dict:
        """The environment a run needs against this stack (`make services` prints it)."""
        options = json.dumps(self.s3.storage_options())
        return {"DAGSTER_HOME": str(dagster_home), "DAGSTER_PG_PASSWORD": self.postgres.password,
                "MLFLOW_TRACKING_URI": self.mlflow.url, **aws_env(self.s3.endpoint),
                "PRECOMPUTE_STORE": f"s3://{self.BUCKET}/activations", "PRECOMPUTE_STORE_OPTIONS": options,
                "PRECOMPUTE_DATA": f"s3://{self.BUCKET}/images/", "PRECOMPUTE_DATA_OPTIONS": options}


_SHARED: Optional[Stack] = None


def shared_stack() -> Stack:
    """One started stack per process (a test session); ``Stack.stop`` may be called more than once."""
    global _SHARED
    if _SHARED is None or _SHARED.mlflow is None:
        _SHARED = Stack().start()
    return _SHARED


def upload_folder(client, bucket: str, prefix: str, folder: Path) -> int:
    n = 0
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())
        n += 1
    return n


def _interrupt(*_):
    raise KeyboardInterrupt


def main() -> int:
    import argparse
    import shlex

    parser = argparse.ArgumentParser(prog="python -m tests.services", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", help="an image folder to upload to s3://precompute/images/ "
                                         "(default: scikit-learn's digits, the images `make demo` uses)")
    args = parser.parse_args()
    started = time.monotonic()
    stack = Stack()
    # Ctrl-C and `kill PID` stop the stack; SIGINT explicitly too, as a shell without job control
    # starts background commands with SIGINT ignored
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        stack.start()
        home = stack.write_dagster_home(stack.root / "dagster_home")
        if args.images:
            images = Path(args.images)
            if not images.is_dir():
                raise ServiceError(f"--images {images}: not a folder")
        else:
            from precompute.demo_data import write_digits_folder

            images = write_digits_folder(stack.root / "digits")
        uploaded = upload_folder(stack.s3.client(), Stack.BUCKET, "images", images)
        print(f"# services up in {time.monotonic() - started:.1f}s under {stack.root} (Ctrl-C stops them)")
        print(f"# PostgreSQL 127.0.0.1:{stack.postgres.port} (databases dagster, mlflow; pid {stack.postgres.proc.pid})")
        print(f"# moto S3 {stack.s3.endpoint} (bucket {Stack.BUCKET}; pid {stack.s3.proc.pid})")
        print(f"# MLflow {stack.mlflow.url} (backend PostgreSQL, artifacts s3://{Stack.BUCKET}/mlartifacts; "
              f"pid {stack.mlflow.proc.pid})")
        print(f"# {uploaded} files of {images} uploaded to s3://{Stack.BUCKET}/images/")
        print("# in another shell:")
        for name, value in stack.settings(home).items():
            print(f"export {name}={shlex.quote(value)}")
        sys.stdout.flush()
        while all(p.proc.poll() is None for p in (stack.postgres, stack.s3, stack.mlflow)):
            time.sleep(1)
        print("services: a service exited on its own; stopping the others", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except ServiceError as exc:
        print(f"services: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.__exit__(None, None, None)
        print("services: stopped", file=sys.stderr)


# --------------------------------------------------------------------------- what the production tests hold
# (the fixtures `stack` and `prod` are in tests/conftest.py)


@dataclass
class Prod:
    stack: Stack
    instance: dg.DagsterInstance
    resources: dict
    home: Path
    prefix: str        # this test's objects: s3://precompute/<prefix>/...
    experiment: str    # this test's MLflow experiment
    images: Path       # the same photos, local (for predict)

    def fresh_instance(self) -> dg.DagsterInstance:
        """Another instance object on the same dagster.yaml: what it sees came from PostgreSQL."""
        import dagster as dg

        return dg.DagsterInstance.from_config(str(self.home))

    def dagster_sql(self, query: str, *args) -> list[tuple]:
        return sql(self.stack, "dagster", query, *args)

    def mlflow_sql(self, query: str, *args) -> list[tuple]:
        return sql(self.stack, "mlflow", query, *args)

    def mlflow_runs(self, dagster_run_id: str) -> dict[str, tuple]:
        """stage -> (MLflow run id, status), read from the MLflow server's PostgreSQL database."""
        rows = self.mlflow_sql("""SELECT s.value, r.run_uuid, r.status FROM runs r
                                  JOIN tags d ON d.run_uuid = r.run_uuid AND d.key = 'dagster.run_id'
                                  JOIN tags s ON s.run_uuid = r.run_uuid AND s.key = 'stage'
                                  JOIN experiments e ON e.experiment_id = r.experiment_id
                                  WHERE d.value = %s AND e.name = %s""", dagster_run_id, self.experiment)
        return {stage: (run_id, status) for stage, run_id, status in rows}

    def s3_keys(self, prefix: str) -> list[str]:
        pages = self.stack.s3.client().get_paginator("list_objects_v2").paginate(Bucket=Stack.BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


def sql(stack: Stack, db: str, query: str, *args) -> list[tuple]:
    conn = stack.postgres.connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute(query, args)
            return cur.fetchall()
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
