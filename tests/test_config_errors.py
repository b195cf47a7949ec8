"""Bad configuration is rejected before any work, with a message that says what to change.

The values of a stage are checked by their model (precompute.settings) and the cut body by
precompute.body_spec.BodySpec; precompute.validate probes what needs the disk or the network.

Each test asserts the ConfigError's message and that nothing happened: no store folder, no MLflow
database, and an answer within seconds when an endpoint is down. Also the security rules: every
torch.load is weights-only, and the UIs bind to 127.0.0.1.
"""

from __future__ import annotations

import ast
import http.server
import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from precompute import body_spec, validate
from precompute.archs import ARCHS
from precompute.body_spec import BodySpec
from precompute.heads import HeadConfig
from precompute.settings import (ActivationSettings, AugmentationSettings, HeadSettings, ImageStageSettings, all_checks,
                                 check_lrs)
from precompute.train import ConfigError, check_precompute_augment, group_lrs
from precompute.validate import validate_run

PROJECT = Path(__file__).resolve().parents[1]
FAST_S = 5.0  # an unreachable endpoint must fail within this (the probe gives up after 3 s; slack for busy CPUs)


@pytest.fixture
def places(tmp_path):
    """A store folder and an MLflow database that must still not exist after a rejected config."""
    store, db = tmp_path / "store", tmp_path / "mlruns" / "mlflow.db"
    yield {"store": str(store), "tracking_uri": f"sqlite:///{db}"}
    assert not store.exists() and not db.parent.exists(), "a rejected config created files"


def rejected(**kwargs) -> str:
    return refused(validate_run, **kwargs)


def refused(check, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        check(*args, **kwargs)
    return str(info.value)


def closed_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- one test per error


def test_unknown_arch_lists_the_known_ones():
    msg = refused(BodySpec, "resnet19", 0, 224)
    assert "unknown arch 'resnet19'" in msg
    assert ", ".join(sorted(ARCHS)) in msg and "PRECOMPUTE_ARCHS" in msg


@pytest.mark.parametrize("arch, cut, top", [("resnet34", 7, 6), ("resnet34", -1, 6), ("vgg16_bn", 43, 42)])
def test_cut_out_of_range_gives_the_range(arch, cut, top):
    msg = refused(BodySpec, arch, cut)
    assert f"cut (xtra_cut) {cut} is out of range for {arch}: valid cuts are 0..{top}" in msg
    assert "PRECOMPUTE_CUTS" in msg


@pytest.mark.parametrize("lr", [[1e-4, 1e-3], [1e-5, 1e-4, 1e-3, 1e-2]])
def test_learning_rate_list_of_the_wrong_length(lr):
    msg = refused(ImageStageSettings.checked, lrs=lr)
    with pytest.raises(ConfigError) as same:
        group_lrs(lr, 3)  # the check reuses train.group_lrs: one message for one mistake
    assert msg == str(same.value)
    assert f"{len(lr)} learning rates given for 3 layer groups" in msg and "exactly 3" in msg


def test_learning_rates_must_be_usable():
    assert "finite and >= 0" in refused(check_lrs, [1e-3, float("nan"), 1e-2])
    assert "nothing would train" in refused(check_lrs, [1e-3, 0.0, 0.0], frozen=1)
    assert "must look like '1e-4:1e-2'" in refused(ImageStageSettings.checked, lr_range="1e-3")
    # head_augmented trains the head only: rates for the body alone train nothing; finetuned trains them
    assert "nothing would train" in refused(ImageStageSettings.checked, lrs=[1e-3, 1e-3, 0.0])
    ImageStageSettings.checked({"frozen": 0}, lrs=[1e-3, 1e-3, 0.0])


def test_precompute_with_augmentation():
    msg = refused(ImageStageSettings.checked, precompute=True, augment=True)
    with pytest.raises(ConfigError) as same:
        check_precompute_augment(True, True)
    assert msg == str(same.value) and "Set augment=False" in msg and "precompute=False" in msg


@pytest.mark.parametrize("arch, cut, size, smallest, stride", [
    ("resnet18", 0, 16, 32, 32),
    ("resnet18", 1, 8, 16, 16),  # one child earlier: layer4 (2x) is gone
    ("vgg16_bn", 0, 31, 32, 32),  # unpadded pools: 31 px leaves no map at all
])
def test_image_size_too_small_for_the_arch(arch, cut, size, smallest, stride):
    msg = refused(BodySpec, arch, cut, size)
    assert f"image size {size} is too small for {arch} at cut {cut}" in msg
    assert f"downsamples {stride}x" in msg and f"set size >= {smallest}" in msg and "default is 224" in msg
    assert body_spec.min_image_size(arch, cut) == smallest
    BodySpec(arch, cut, smallest)  # the minimum itself is accepted


def test_min_image_size_matches_a_real_forward():
    """The shape-only (meta device) answer agrees with a real body."""
    from precompute.archs import body_output_shape, cut_body

    spec = ARCHS["resnet18"]
    body = cut_body(spec.build(), spec, 0)
    smallest = body_spec.min_image_size("resnet18", 0)
    assert body_output_shape(body, smallest)[1:] == (1, 1)
    assert body_output_shape(body, 2 * smallest)[1:] == (2, 2)
    assert next(body_spec._shape_body("resnet18", 0).parameters()).is_meta  # the check allocates no weights


def test_unreachable_s3_store_fails_fast_and_names_the_setting(places):
    pytest.importorskip("s3fs")
    port = closed_port()
    url = "s3://team-bucket/activations"
    start = time.perf_counter()
    msg = rejected(store=url, storage_options={"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s"},
                   tracking_uri=places["tracking_uri"])
    assert time.perf_counter() - start < FAST_S
    assert f"activation store {url!r} is unreachable" in msg and f"127.0.0.1:{port}" in msg
    assert "PRECOMPUTE_STORE" in msg and "PRECOMPUTE_STORE_OPTIONS" in msg


def test_s3_store_through_a_reachable_endpoint(places):
    """Against moto's S3 server: a missing bucket is named (and not created); an existing one passes
    and keeps no probe object."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            endpoint = "http://{}:{}".format(*server.get_host_and_port())
            options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                  aws_access_key_id="testing", aws_secret_access_key="testing")
            client.create_bucket(Bucket="acts")
            # moto keeps its buckets per process: other test modules' buckets may be there too
            before = {b["Name"] for b in client.list_buckets()["Buckets"]}
            msg = rejected(store="s3://no-such-bucket/acts", storage_options=options)
            assert "bucket does not exist" in msg and "PRECOMPUTE_STORE" in msg
            validate_run(store="s3://acts/team/cache", storage_options=json.dumps(options))
            assert {b["Name"] for b in client.list_buckets()["Buckets"]} == before  # nothing created
            assert client.list_objects_v2(Bucket="acts")["KeyCount"] == 0
        finally:
            server.stop()


def test_store_options_must_be_json(places):
    msg = rejected(store=places["store"], storage_options="{endpoint_url: x}", tracking_uri=places["tracking_uri"])
    assert "not valid JSON" in msg and "PRECOMPUTE_STORE_OPTIONS" in msg


def test_local_store_that_cannot_be_created(tmp_path, places):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    msg = rejected(store=str(blocker / "store"), tracking_uri=places["tracking_uri"])
    assert f"{blocker} is a file, not a folder" in msg and "PRECOMPUTE_STORE" in msg
    assert blocker.read_text() == "x"


def test_unreachable_mlflow_server_fails_fast(places):
    uri = f"http://127.0.0.1:{closed_port()}"
    start = time.perf_counter()
    msg = rejected(tracking_uri=uri, store=places["store"])
    assert time.perf_counter() - start < FAST_S
    assert f"MLflow tracking URI {uri!r} is unreachable" in msg and "Connection refused" in msg
    assert "MLFLOW_TRACKING_URI" in msg and "sqlite:///" in msg


def test_an_endpoint_that_never_answers_is_given_up_on(monkeypatch):
    def hang(*args, **kwargs):
        time.sleep(30)

    monkeypatch.setattr(socket, "create_connection", hang)  # a black-holed address or a stuck DNS look-up
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"no answer within 0.5 s"):
        validate.check_tracking("http://mlflow.internal:5000", timeout_s=0.5)
    assert time.perf_counter() - start < 2


def test_mlflow_sqlite_path_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    msg = rejected(tracking_uri=f"sqlite:///{blocker}/mlflow.db")
    assert f"{blocker} is a file, not a folder" in msg and "MLFLOW_TRACKING_URI" in msg


def test_every_error_at_once(places):
    """A model reports every bad value it holds, and all_checks merges the models, the body and the probes."""
    msg = refused(all_checks, lambda: BodySpec("resnet18", 0, 8),
                  lambda: ImageStageSettings.checked(batch_size=1, max_zoom=0.5, schedule="cosine"),
                  lambda: ActivationSettings.checked(dtype="int8"),
                  lambda: validate_run(store=places["store"], tracking_uri=f"http://127.0.0.1:{closed_port()}"))
    assert msg.startswith("6 configuration errors, nothing was run:\n- image size 8 is too small for resnet18")
    for part in ("schedule 'cosine': choose one of one_cycle, sgdr, constant", "batch_size 1: use 2 or more",
                 "max_zoom 0.5: use 1 or more", "dtype 'int8': choose one of float32, float16, bfloat16",
                 "MLFLOW_TRACKING_URI"):
        assert part in msg
    # the rules between values (precompute x augmentation, rates per group): all of them at once too
    msg = refused(ImageStageSettings.checked, precompute=True, augment=True, lrs=[1.0, 2.0])
    assert msg.startswith("2 configuration errors") and "Set augment=False" in msg and "2 learning rates" in msg


def test_other_values(tmp_path, monkeypatch):
    monkeypatch.delenv("PRECOMPUTE_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path / "hub"))
    assert "is not in the torch hub cache" in rejected(arch="resnet18", weights="pretrained")
    assert "weights_path" in rejected(arch="resnet18", weights_path=str(tmp_path / "none.pt"))
    assert "'package.module:function'" in refused(HeadConfig, custom="no_such_module:head")
    assert "ps has 1 dropout values for 3 linear blocks" in refused(HeadSettings.checked, ps=[0.5], xtra_fc=[512, 256])
    assert "augmentation 'sideways': choose one of basic, side_on, top_down" in refused(
        AugmentationSettings.checked, augmentation="sideways")
    assert "max_zoom 0.9" in refused(AugmentationSettings.checked, max_zoom=0.9)
    validate_run(arch="resnet18", weights="random")
    ActivationSettings.checked(weights="random", batch_size=2, dtype="float16")
    HeadConfig(custom="linear")
    AugmentationSettings.checked(augmentation="top_down", max_zoom=1.2)
    HeadSettings.checked(ps=[0.25, 0.5], xtra_fc=[512])


def test_manifest_must_train_and_measure():
    import pandas as pd

    def manifest(rows):
        return pd.DataFrame([dict(label=l, split=s, status=st) for l, s, st in rows])

    one_class = manifest([("a", "train", "ok"), ("a", "train", "ok"), ("a", "valid", "ok"), ("b", "train", "empty")])
    msg = rejected(manifest=one_class)
    assert "2 usable train images in 1 class(es) ['a']" in msg and "'empty': 1" in msg
    no_valid = manifest([("a", "train", "ok"), ("b", "train", "ok")])
    assert "no usable valid image" in rejected(manifest=no_valid)


# --------------------------------------------------------------------------- reachable: accepted


def test_reachable_endpoints_are_accepted(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:  # any HTTP answer means a server is there; MLflow itself reports auth and API errors
        validate_run(tracking_uri=f"http://127.0.0.1:{server.server_address[1]}", store=str(tmp_path / "store"))
    finally:
        server.shutdown()
    validate_run(tracking_uri=f"sqlite:///{tmp_path}/new/mlflow.db", store=f"file://{tmp_path}/new/store")
    assert not (tmp_path / "new").exists()  # accepted without creating anything


# --------------------------------------------------------------------------- security


SKIP_DIRS = {".venv", "venv", ".git", "var", "node_modules", "build", "dist", "out", "__pycache__", ".pytest_cache"}


def python_sources() -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(PROJECT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        found += [Path(folder, f) for f in files if f.endswith(".py")]
    return sorted(found)


def unsafe_loads(source: str) -> list[tuple[int, str]]:
    """torch.load without weights_only=True, and pickle loads: both can run code from a file."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kwargs = {k.arg: k.value for k in node.keywords}
        if name in ("torch.load", "torch.serialization.load"):
            weights_only = kwargs.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append((node.lineno, ast.unparse(node)))
        elif name in ("pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "dill.load", "joblib.load"):
            found.append((node.lineno, ast.unparse(node)))
        elif name in ("np.load", "numpy.load") and isinstance(kwargs.get("allow_pickle"), ast.Constant) \
                and kwargs["allow_pickle"].value:
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_every_torch_load_is_weights_only():
    assert unsafe_loads("import torch\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
                        "torch.load(p, map_location='cpu', weights_only=True)\npickle.loads(b)\n") == [
        (2, "torch.load(p)"), (3, "torch.load(p, weights_only=False)"), (5, "pickle.loads(b)")]
    sources = python_sources()
    assert PROJECT / "precompute" / "weights.py" in sources
    offenders = {f"{p.relative_to(PROJECT)}:{line}": call for p in sources for line, call in unsafe_loads(p.read_text())}
    assert offenders == {}, "load model files with torch.load(..., weights_only=True): " + str(offenders)
    calls = sum(p.read_text().count("torch.load(") for p in sources)
    assert calls >= 2  # the scan sees the real calls (weights, cached heads)


UI_COMMAND = re.compile(r"""bin/(dagster"?\s+dev|dagster-webserver"?|mlflow"?\s+(?:ui|server))\b(.*)""")


def test_uis_bind_to_localhost():
    files = [PROJECT / "Makefile", PROJECT / "README.md", *PROJECT.glob("scripts/*"), *PROJECT.glob(".ci/*"),
             *PROJECT.glob("pipelines/*.py")]
    commands = []
    for path in files:
        if not path.is_file():
            continue
        text = re.sub(r"\\\n\s*", " ", path.read_text())  # join continued lines
        for line in text.splitlines():
            if line.lstrip().startswith("#"):
                continue
            for match in UI_COMMAND.finditer(line):
                commands.append((path.name, match.group(1), match.group(2)))
    assert any(name == "Makefile" or name.endswith(".sh") for name, _, _ in commands), commands
    for name, tool, args in commands:
        host = re.search(r"(?:-h|--host)[=\s]+\"?([^\s\"]+)", args)
        assert host, f"{name}: {tool} without an explicit host: add -h/--host 127.0.0.1"
        assert host.group(1) in ("127.0.0.1", "localhost"), f"{name}: {tool} binds to {host.group(1)}"


# --------------------------------------------------------------------------- in the assets


def _assets_validate() -> bool:
    return all("validate_run" in (PROJECT / "assets" / f"{name}.py").read_text() for name in ("activations", "training"))


@pytest.mark.skipif(not _assets_validate(), reason="the assets do not call precompute.validate yet")
def test_activations_asset_rejects_before_any_work(tmp_path, dogscats):
    import dagster as dg

    from assets import activations, image_manifest
    from resources import ActivationStoreResource, ComputeDevice, ImageSource
    from tests.conftest import copy_tree

    images = copy_tree(dogscats, tmp_path / "images", {"train": 2, "valid": 1})
    store = tmp_path / "store"
    resources = {"images": ImageSource(source=str(images)), "store": ActivationStoreResource(root=str(store)),
                 "compute": ComputeDevice(device="cpu")}

    def run(config: dict):
        return dg.materialize([image_manifest, activations], partition_key="resnet34|0", raise_on_error=False,
                              resources=resources, run_config={"ops": {"activations": {"config": config}}})

    # a value outside a choice: refused when the run is launched, by Dagster's config check (the launchpad's)
    with pytest.raises(dg.DagsterInvalidConfigError, match="int8") as launch:
        run({"dtype": "int8"})
    assert "float32" in str(launch.value) and "bfloat16" in str(launch.value)
    # a size the arch cannot take and weights that are not there: in the step, before any work
    result = run({"size": 16, "weights_path": str(tmp_path / "no.pt")})
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure).step_failure_data
    assert "2 configuration errors" in failure.error.message and "set size >= 32" in failure.error.message
    assert "no.pt is not a file" in failure.error.message
    assert not store.exists()  # rejected before the store was touched or a weight was loaded
