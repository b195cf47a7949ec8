import os
import shutil
import uuid
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

DOGSCATS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dogscats"


@pytest.fixture(scope="session")
def dogscats() -> Path:
    if not (DOGSCATS / "train").is_dir():
        pytest.skip(f"real photos not found at {DOGSCATS} (the shared data folder beside the project)")
    return DOGSCATS


def copy_tree(src: Path, dst: Path, per_class: dict[str, int]) -> Path:
    """A small ImageNet-style tree with the first n photos of each split/class of ``src``."""
    for split, n in per_class.items():
        for cls_dir in sorted((src / split).iterdir()):
            out = dst / split / cls_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(cls_dir.iterdir())[:n]:
                shutil.copy(f, out / f.name)
    return dst


@pytest.fixture
def tiny_tree(tmp_path, dogscats) -> Path:
    """8 train and 4 valid photos per class, copied into a temporary folder."""
    return copy_tree(dogscats, tmp_path / "images", {"train": 8, "valid": 4})


@pytest.fixture(scope="session")
def endpoint():
    """moto's S3 server on 127.0.0.1 (a free port), with test credentials; stopped at the end."""
    moto_server = pytest.importorskip("moto.server")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE",
                     "AWS_SHARED_CREDENTIALS_FILE", "PRECOMPUTE_DATA_OPTIONS"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def bucket(endpoint):
    """A fresh bucket per test: (name, boto3 client, fsspec storage_options)."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    name = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=name)
    return name, client, {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
