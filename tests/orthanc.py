"""A throw-away Orthanc with its DICOMweb plugin (Debian packages ``orthanc``, ``orthanc-dicomweb``).

:func:`orthanc_fixture` (fixture ``orthanc``; import it into a test module) starts its own ``Orthanc`` process on a free loopback port with a generated
configuration: a temporary storage folder, HTTP basic authentication with a test user, the DICOM
port off, the DICOMweb plugin at ``/dicom-web``. The system service is never used.

The TotalSegmentator test series is anonymised down to empty Study, Series and SOP Instance UIDs,
which a PACS does not accept; :func:`archive_ready` fills them in (SOP UIDs from each file's
meta header, one new study and series UID) without touching the pixel data.
"""

from __future__ import annotations

import glob
import io
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.conftest import unavailable

__all__ = ["USER", "Orthanc", "archive_ready", "orthanc_fixture"]

USER = ("segassist-test", "orthanc-secret-7f3a")
_PLUGIN_GLOBS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/lib/*/orthanc/libOrthancDicomWeb.so*",
)
_START_SECONDS = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _plugin() -> str | None:
    for pattern in _PLUGIN_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


@dataclass
class Orthanc:
    """A running Orthanc: ``url`` (REST root), ``dicomweb`` (DICOMweb root), ``auth``."""

    process: subprocess.Popen[bytes]
    url: str
    folder: Path

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return USER

    def store(self, datasets: list[Dataset]) -> None:
        """Upload instances through Orthanc's own REST API (not the code under test)."""
        with httpx.Client(auth=self.auth, timeout=60) as client:
            for dataset in datasets:
                buffer = io.BytesIO()
                dataset.save_as(buffer, enforce_file_format=True)
                answer = client.post(f"{self.url}/instances", content=buffer.getvalue())
                answer.raise_for_status()

    def series(self, modality: str | None = None) -> list[dict[str, object]]:
        """Orthanc's own record of every series (``MainDicomTags``), optionally of a modality."""
        with httpx.Client(auth=self.auth, timeout=60) as client:
            found = client.get(f"{self.url}/series", params={"expand": ""}).json()
        return [s for s in found if modality in (None, s["MainDicomTags"].get("Modality"))]

    def kill(self) -> None:
        """SIGKILL: the end of a throw-away server (a clean stop waits about 2.5 s)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> None:
        """A clean stop (SIGTERM), as an administrator stops the server."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


def _started(folder: Path) -> Orthanc:
    binary = shutil.which("Orthanc")
    plugin = _plugin()
    if binary is None or plugin is None:
        unavailable(
            "Orthanc with its DICOMweb plugin is not installed (Debian: apt-get install orthanc "
            "orthanc-dicomweb; .ci/run installs them)"
        )
    port = _free_port()
    config = {
        "Name": "segassist-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER[0]: USER[1]},
        "DicomServerEnabled": False,
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config))
    log = (folder / "orthanc.log").open("ab")
    process = subprocess.Popen([str(binary), str(path)], stdout=log, stderr=subprocess.STDOUT)
    server = Orthanc(process, f"http://127.0.0.1:{port}", folder)
    deadline = time.monotonic() + _START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            if httpx.get(f"{server.dicomweb}/series", auth=USER, timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    log_text = (folder / "orthanc.log").read_text(errors="replace")[-2000:]
    pytest.fail(f"Orthanc did not come up on port {port}:\n{log_text}")


@pytest.fixture(name="orthanc")
def orthanc_fixture(tmp_path: Path) -> Iterator[Orthanc]:
    """A fresh Orthanc with the DICOMweb plugin and an empty store; stopped after the test."""
    folder = tmp_path / "orthanc"
    folder.mkdir()
    server = _started(folder)
    try:
        yield server
    finally:
        server.kill()


def archive_ready(files: list[Path]) -> list[Dataset]:
    """The series in ``files`` with the UIDs a PACS needs (module docstring)."""
    study_uid, series_uid = generate_uid(), generate_uid()
    datasets = []
    for path in files:
        dataset = pydicom.dcmread(path)
        dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
        dataset.StudyInstanceUID = study_uid
        dataset.SeriesInstanceUID = series_uid
        dataset.PatientID = dataset.PatientID or "totalsegmentator-test"
        dataset.PatientName = dataset.PatientName or "TotalSegmentator^Test"
        datasets.append(dataset)
    return datasets
