"""The logged model serves images: an MLflow pyfunc with the stage's own transform and a signature,
registered per arch and cut, installable from PyPI, predicting what `precompute predict` predicts."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from precompute import Learner
from precompute.cli import main as cli
from precompute.records import checked_record
from precompute.serving import NOT_READ, ROOTS_ENV, URLS_ENV
from precompute.tracking import Tracker

NAME = "precompute-tf_efficientnet_lite0-cut0"


@pytest.fixture(scope="module")
def logged(tmp_path_factory, dogscats):
    """A head trained for one epoch on a tiny photo tree (64 px), exported, and logged the way the
    finetuned stage logs its model, in a fresh MLflow store. Shared by this module's tests: they only
    read it."""
    from tests.conftest import copy_tree

    tmp_path = tmp_path_factory.mktemp("logged")
    tiny_tree = copy_tree(dogscats, tmp_path / "images", {"train": 8, "valid": 4})
    learn = Learner.pretrained("tf_efficientnet_lite0", tiny_tree, size=64, store=str(tmp_path / "store"), bs=8,
                               verbose=False)
    learn.fit(3e-3, 1)
    model_file = learn.export(tmp_path / "model.pt")
    record = checked_record(torch.load(model_file, weights_only=True), str(model_file))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    import mlflow.pyfunc  # its own import-time notices are not the model's
    with Tracker(uri, artifact_root=str(tmp_path / "artifacts")).run("finetuned test") as run, \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = run.pytorch_model(record, "network")
    # no pickle, requirements, type hint or input example warnings from logging the model
    # (ResourceWarnings are hidden by default; one may come from any earlier object the GC collects here)
    assert [str(w.message) for w in caught if not issubclass(w.category, ResourceWarning)] == []
    images = tmp_path / "new_photos"
    shutil.copytree(tiny_tree / "valid", images)
    (images / "broken.jpg").write_bytes(b"not a jpeg")  # unreadable: a row saying so, not a failed request
    return uri, run.run_id, info, model_file, images


def test_registered_pyfunc_predicts_as_precompute_predict(logged, tmp_path, monkeypatch, capsys):
    uri, run_id, info, model_file, images = logged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    (version,) = client.search_model_versions(f"name = '{NAME}'")
    assert version.run_id == run_id and info.registered_model_version == int(version.version)

    # the reference: precompute predict on the folder
    out_csv = tmp_path / "predictions.csv"
    assert cli(["predict", "--model", str(model_file), "--images", str(images), "--out", str(out_csv)]) == 0
    want = pd.read_csv(out_csv)
    ok = want[want["status"] == "ok"].reset_index(drop=True)
    assert len(ok) == 8 and (want["status"] != "ok").sum() == 1
    probs = [c for c in want.columns if c.startswith("prob_")]
    assert probs == ["prob_cats", "prob_dogs"]

    # the operator lets this process read the folder (a model config; `mlflow models serve` takes the environment)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/{version.version}", model_config={"image_roots": [str(images)]})
    inputs = model.metadata.get_input_schema().input_names()
    assert inputs == ["path", "image"]
    assert model.metadata.get_output_schema().input_names() == ["status", "reason", "predicted"] + probs
    got = model.predict(pd.DataFrame({"path": list(want["path"])}))
    assert list(got["status"] == "ok") == list(want["status"] == "ok")  # the broken file too
    good = got[got["status"] == "ok"].reset_index(drop=True)
    assert list(good["predicted"]) == list(ok["predicted"])
    # the same transform, weights and batches: equal up to the CSV's float formatting
    np.testing.assert_allclose(good[probs].to_numpy(float), ok[probs].to_numpy(), rtol=0, atol=1e-6)
    # bytes in, the same out
    blobs = [Path(p).read_bytes() for p in ok["path"]]
    from_bytes = model.predict(pd.DataFrame({"image": blobs}))
    assert list(from_bytes["predicted"]) == list(ok["predicted"])
    np.testing.assert_allclose(from_bytes[probs].to_numpy(float), ok[probs].to_numpy(), rtol=0, atol=1e-6)

    # what pip would install: PyPI versions, no local version tags (torch==2.x+cu130 cannot install)
    reqs = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version.version}/requirements.txt",
                                                     dst_path=str(tmp_path / "reqs"))).read_text()
    assert "+" not in reqs
    assert any(line.startswith("torch==") for line in reqs.splitlines())
    assert "dagster" not in reqs

    # the CLI MLflow serves with: `mlflow models predict` on a CSV of paths
    pd.DataFrame({"path": list(ok["path"])}).to_csv(tmp_path / "input.csv", index=False)
    done = subprocess.run([str(Path(sys.executable).parent / "mlflow"), "models", "predict", "-m",
                           f"models:/{NAME}/{version.version}", "-i", str(tmp_path / "input.csv"), "-t", "csv",
                           "-o", str(tmp_path / "out.json"), "--env-manager", "local"],
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri, ROOTS_ENV: str(images)},  # the operator
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    served = pd.DataFrame(json.loads((tmp_path / "out.json").read_text())["predictions"])
    assert list(served["predicted"]) == list(ok["predicted"])
    np.testing.assert_allclose(served[probs].to_numpy(), ok[probs].to_numpy(), rtol=0, atol=1e-6)


    # a run without a model file (this one logged the pyfunc only; a head_on_cache run has none):
    # precompute predict says so in one line
    capsys.readouterr()
    assert cli(["predict", "--model", run_id, "--images", str(images), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "finetuned" in err and "Traceback" not in err


# ------------------------------------------------------------------ what the served model may read

def load(logged, **config):
    uri, *_ = logged
    mlflow.set_tracking_uri(uri)
    return mlflow.pyfunc.load_model(f"models:/{NAME}/1", model_config=config or None)


def photos(logged) -> list[Path]:
    return sorted(p for p in logged[4].rglob("*.jpg") if p.name != "broken.jpg")


def refused(rows: pd.DataFrame) -> None:
    """Every row is the one neutral refusal: status, reason, no class and no probability."""
    assert set(rows["status"]) == {"unreadable"} and set(rows["reason"]) == {NOT_READ}, rows[["status", "reason"]]
    assert set(rows["predicted"]) == {""}
    assert rows[[c for c in rows.columns if c.startswith("prob_")]].isna().all().all()


@pytest.fixture
def site():
    """An HTTP server on 127.0.0.1 standing for a service inside the network: ``/internal/admin`` answers
    with a photo (a leak would be classified "ok"), ``/photos/<name>`` serves photos,
    ``/photos/moved.jpg`` redirects to the admin page. Yields (base URL, served photos, requests seen)."""
    import http.server
    import threading

    seen: list[str] = []
    files: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(self.path)
            name = self.path.split("?", 1)[0]
            if name == "/photos/moved.jpg":
                self.send_response(302)
                self.send_header("Location", "/internal/admin?token=x.jpg")
                self.end_headers()
                return
            body = files.get("admin") if name == "/internal/admin" else files.get(name.removeprefix("/photos/"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", files, seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_served_model_reads_only_the_bytes_it_is_sent(logged, tmp_path):
    """By default no path is opened: a server file, a missing one and a real photo get the same row."""
    model = load(logged)
    photo = photos(logged)[0]
    got = model.predict(pd.DataFrame({"path": ["/etc/passwd", "/no/such/file.jpg", str(photo), str(tmp_path)]}))
    refused(got)
    # bytes are what the model takes
    ok = model.predict(pd.DataFrame({"image": [photo.read_bytes()]}))
    assert list(ok["status"]) == ["ok"] and ok["predicted"][0] in ("cats", "dogs")
    # bytes that are not an image: the client's own bytes, so the reason may say why
    bad = model.predict(pd.DataFrame({"image": [b"not an image"]}))
    assert list(bad["status"]) == ["unreadable"] and bad["reason"][0] != NOT_READ


def test_paths_only_under_the_operators_roots(logged, tmp_path):
    """Paths are resolved (``..``, symlinks) before the root is checked, and every refusal reads the same:
    no answer tells an existing file from a missing one."""
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(photos(logged)[0].read_bytes())  # a real photo, outside the root
    inside = root / "inside.jpg"
    inside.write_bytes(photos(logged)[1].read_bytes())
    (root / "link.jpg").symlink_to(outside)  # a symlink leaving the root
    (root / "sub").mkdir()
    (root / "text.jpg").write_text("not an image")
    (root / "unreadable.jpg").write_bytes(inside.read_bytes())
    (root / "unreadable.jpg").chmod(0)
    os.mkfifo(root / "fifo.jpg")  # opening it for reading would block a worker forever
    model = load(logged, image_roots=[str(root)])
    refused_paths = ["/etc/passwd", "/etc/no-such-file", str(outside), f"{root}/../outside.jpg", str(root / "link.jpg"),
                     str(root / "missing.jpg"), str(root / "sub"), str(root / "text.jpg"), str(root / "fifo.jpg"),
                     f"{root}/sub/../../outside.jpg", "relative/../../../etc/passwd", "", "a\0b"]
    if os.geteuid() != 0:  # root reads a file without permissions
        refused_paths.append(str(root / "unreadable.jpg"))
    got = model.predict(pd.DataFrame({"path": refused_paths + [str(inside), f"{root}/sub/../inside.jpg"]}))
    refused(got.iloc[:-2])
    assert list(got["status"].iloc[-2:]) == ["ok", "ok"]
    # the same photo by path and by bytes: the same numbers
    by_bytes = model.predict(pd.DataFrame({"image": [inside.read_bytes()]}))
    probs = [c for c in got.columns if c.startswith("prob_")]
    np.testing.assert_allclose(got[probs].iloc[-1].to_numpy(float), by_bytes[probs].iloc[0].to_numpy(float),
                               rtol=0, atol=1e-6)


def test_urls_only_from_the_allow_list(logged, site, monkeypatch):
    base, files, seen = site
    photo = photos(logged)[0].read_bytes()
    files["admin"] = files["cat.jpg"] = photo
    admin = f"{base}/internal/admin?token=x.jpg"
    refused(load(logged).predict(pd.DataFrame({"path": [admin, f"{base}/photos/cat.jpg"]})))
    assert seen == []  # nothing fetched

    monkeypatch.setenv(URLS_ENV, f"{base}/photos/")
    model = load(logged)
    got = model.predict(pd.DataFrame({"path": [
        f"{base}/photos/cat.jpg",
        admin,
        f"{base}/photos/../internal/admin?token=x.jpg",  # a server would normalize it to the admin page
        f"{base}/photos/%2e%2e/internal/admin?token=x.jpg",
        f"{base}/photos/moved.jpg",  # an allowed URL that redirects elsewhere: not followed
        f"{base}/photos/missing.jpg",
        f"{base.replace('http:', 'https:')}/photos/cat.jpg",  # another scheme
        f"http://user@{base.removeprefix('http://')}/photos/cat.jpg",
        f"{base}/photosx/cat.jpg",  # a prefix is a folder, not a string prefix
        "file:///etc/passwd",
    ]}))
    assert got["status"][0] == "ok"
    refused(got.iloc[1:])
    assert "/internal/admin?token=x.jpg" not in seen
    by_bytes = model.predict(pd.DataFrame({"image": [photo]}))
    probs = [c for c in got.columns if c.startswith("prob_")]
    np.testing.assert_allclose(got[probs].iloc[0].to_numpy(float), by_bytes[probs].iloc[0].to_numpy(float),
                               rtol=0, atol=1e-6)


def test_bad_serving_settings_fail_when_the_model_loads(logged, tmp_path, monkeypatch):
    """An operator's typo is an error at start, saying which setting, not a server refusing everything."""
    with pytest.raises(Exception, match=ROOTS_ENV):
        monkeypatch.setenv(ROOTS_ENV, str(tmp_path / "no-such-folder"))
        load(logged)
    monkeypatch.delenv(ROOTS_ENV)
    with pytest.raises(Exception, match="image_roots"):
        load(logged, image_roots=str(tmp_path))  # a string, not a list
    with pytest.raises(Exception, match=URLS_ENV):
        monkeypatch.setenv(URLS_ENV, "cdn.example.com/photos")  # no scheme
        load(logged)


def readme_serve_command() -> list[str]:
    """The serve command exactly as the README prints it."""
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (line,) = [x for x in readme.splitlines() if x.startswith(".venv/bin/precompute serve ")]
    return shlex.split(line)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_serve_command_over_http(logged, tmp_path, site):
    """The README's command, run as printed from a shell whose PATH lacks the virtual environment, serves
    the model over HTTP: bytes in, valid JSON out, server files and internal URLs refused alike."""
    import base64
    import signal
    import sysconfig
    import time
    import urllib.request

    uri, _, _, _, images = logged
    base, files, seen = site
    files["admin"] = photos(logged)[0].read_bytes()
    cmd = readme_serve_command()
    assert cmd[0] == ".venv/bin/precompute" and "--port" in cmd
    port = free_port()
    cmd[0] = str(Path(sysconfig.get_path("scripts")) / "precompute")  # this environment's .venv/bin
    cmd[cmd.index("--port") + 1] = str(port)
    env = {**os.environ, "PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": uri, ROOTS_ENV: str(images)}
    env.pop(URLS_ENV, None)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a guard against a hang, not a timing
        while True:
            assert proc.poll() is None, f"exited {proc.returncode}: {log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)

        def invoke(columns: list[str], data: list[list]) -> list[dict]:
            body = json.dumps({"dataframe_split": {"columns": columns, "data": data}}).encode()
            req = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                text = r.read().decode()

            def not_json(const):
                raise AssertionError(f"{const} in the response, which is not JSON: {text[:500]}")

            return json.loads(text, parse_constant=not_json)["predictions"]

        photo = photos(logged)[0]
        got = invoke(["path"], [["/etc/passwd"], ["/no/such/file"], [f"{base}/internal/admin?token=x.jpg"],
                                [str(photo)]])
        assert [r["status"] for r in got] == ["unreadable"] * 3 + ["ok"]
        assert {r["reason"] for r in got[:3]} == {NOT_READ}
        assert all(r[k] is None for r in got[:3] for k in r if k.startswith("prob_"))  # null, not NaN
        assert seen == []
        sent = invoke(["image"], [[base64.b64encode(photo.read_bytes()).decode()]])
        assert sent[0]["status"] == "ok" and sent[0]["predicted"] == got[3]["predicted"]
        assert sent[0]["prob_cats"] == pytest.approx(got[3]["prob_cats"], abs=1e-6)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the uvicorn it started, by the group we started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
