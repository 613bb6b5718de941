"""A dataset's DICOMweb server (Orthanc, a PACS): QIDO-RS search, WADO-RS fetch, STOW-RS store.

The connection settings (:class:`DicomwebSettings`) live on the dataset row; the password never
leaves it: :func:`public_url` drops any user info from a URL before it is shown, and every failure
becomes a :class:`DicomwebError` whose message names the server by that URL and the HTTP status,
never the credentials. Network failures are 502/503 (the server is down or broke off), refusals
of the credentials 424 (the dataset's settings need fixing), a missing series 404.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session, create_session_from_user_pass
from fastapi import HTTPException, status
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydicom.dataset import Dataset

__all__ = [
    "DicomwebError",
    "DicomwebServer",
    "DicomwebSettings",
    "RemoteSeries",
    "public_url",
]

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 5.0
"""Longest wait for a connection to the DICOMweb server."""
TIMEOUT_SECONDS = 60.0
"""Longest wait for one DICOMweb response once connected."""
RETRY_ATTEMPTS = 3
"""Tries of one request (waits 0.5 s, then 1 s) before a failure is reported."""


def public_url(url: str) -> str:
    """``url`` without user name and password (what may be shown, logged or returned)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


URL_PATTERN = (
    r"^\s*[Hh][Tt][Tt][Pp][Ss]?://"
    r'([!"$-.0->A-Z\\^-~]*@)?'  # user info: printable ASCII but / ? # @ [ ]
    r"[A-Za-z0-9._~-]+"
    r"(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4}))?"
    r"([/?#][!-~]*)?\s*$"
)
"""What a DICOMweb root may look like (in the OpenAPI document too): ``http(s)://``, optional
user info, a host name or IPv4 address, an optional valid port, a path; printable ASCII only
(other characters percent-encoded, as in any URL sent on the wire)."""


class DicomwebSettings(BaseModel):
    """How to reach a dataset's DICOMweb server.

    Attributes:
        url: the DICOMweb root, e.g. ``http://orthanc:8042/dicom-web`` (user info in the URL is
            moved to ``username``/``password``).
        username: HTTP basic user name (empty = no authentication).
        password: its password (stored with the dataset; never returned or logged).
    """

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048, pattern=URL_PATTERN)
    username: str = Field(default="", max_length=255)
    password: SecretStr = Field(default=SecretStr(""), max_length=255)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"DICOMweb url must be http(s)://host[:port]/path, got {public_url(url)!r}"
            )
        return url.strip()

    def normalised(self) -> DicomwebSettings:
        """The same settings with user info moved out of the URL."""
        parts = urlsplit(self.url)
        username = self.username or (parts.username or "")
        password = self.password.get_secret_value() or (parts.password or "")
        return DicomwebSettings(
            url=public_url(self.url), username=username, password=SecretStr(password)
        )

    def stored(self) -> dict[str, str]:
        """The dataset row's ``dicomweb`` value."""
        settings = self.normalised()
        return {
            "url": settings.url,
            "username": settings.username,
            "password": settings.password.get_secret_value(),
        }

    @classmethod
    def from_row(cls, value: dict[str, Any]) -> DicomwebSettings:
        """Settings from a dataset row's ``dicomweb`` value."""
        return cls(
            url=str(value["url"]),
            username=str(value.get("username") or ""),
            password=SecretStr(str(value.get("password") or "")),
        )


class DicomwebError(HTTPException):
    """A DICOMweb request failed: the HTTP error to answer with (``detail`` names the server)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(status_code, message)
        self.message = message


class RemoteSeries(BaseModel):
    """One series as QIDO-RS lists it."""

    series_uid: str
    study_uid: str
    modality: str | None = None
    description: str | None = None
    series_number: int | None = None
    instances: int | None = None
    patient_id: str | None = None
    study_date: str | None = None


def _value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or []
    return values[0] if values else None


def _remote_series(item: dict[str, Any]) -> RemoteSeries:
    number = _value(item, "00200011")
    count = _value(item, "00201209")
    return RemoteSeries(
        series_uid=str(_value(item, "0020000E")),
        study_uid=str(_value(item, "0020000D")),
        modality=_value(item, "00080060"),
        description=_value(item, "0008103E"),
        series_number=int(number) if number is not None else None,
        instances=int(count) if count is not None else None,
        patient_id=_value(item, "00100020"),
        study_date=_value(item, "00080020"),
    )


class DicomwebServer:
    """The DICOMweb server of one dataset (``dicomweb-client`` underneath).

    Args:
        settings: URL and credentials.
    """

    def __init__(self, settings: DicomwebSettings) -> None:
        self.settings = settings.normalised()
        self.url = self.settings.url
        username = self.settings.username
        password = self.settings.password.get_secret_value()
        session = (
            create_session_from_user_pass(username, password) if username else create_session()
        )
        self._client = DICOMwebClient(
            self.url, session=session, timeout=(CONNECT_TIMEOUT_SECONDS, TIMEOUT_SECONDS)
        )
        # dicomweb-client retries every failed request (also refused connections) 5 times with
        # waits doubling from 2 s: a stopped server would answer after 30 s. Two quick retries.
        self._client.set_http_retry_params(
            retry=True, max_attempts=RETRY_ATTEMPTS, wait_exponential_multiplier=250
        )

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn every failure of a request into a :class:`DicomwebError` naming the server."""
        where = f"DICOMweb server {self.url}"
        try:
            yield
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            if code in (401, 403):
                raise DicomwebError(
                    status.HTTP_424_FAILED_DEPENDENCY,
                    f"{where} refused the dataset's credentials while {action} (HTTP {code}):"
                    " fix the dataset's dicomweb username and password",
                ) from None
            if code == 404:
                raise DicomwebError(
                    status.HTTP_404_NOT_FOUND, f"{where} has no such object ({action}: HTTP 404)"
                ) from None
            raise DicomwebError(
                status.HTTP_502_BAD_GATEWAY, f"{where} answered HTTP {code} while {action}"
            ) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            logger.warning("%s unreachable while %s: %s", where, action, type(exc).__name__)
            raise DicomwebError(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"{where} is unreachable or broke off while {action}"
                f" ({type(exc).__name__}); nothing was stored: try again when it is back",
            ) from None
        except (requests.RequestException, ValueError, OSError) as exc:
            raise DicomwebError(
                status.HTTP_502_BAD_GATEWAY,
                f"{where} sent an answer that could not be read while {action}"
                f" ({type(exc).__name__})",
            ) from None

    def list_series(self, modality: str | None = None, limit: int = 1000) -> list[RemoteSeries]:
        """Every series of the server (QIDO-RS), optionally of one modality."""
        filters = {"Modality": modality} if modality else None
        with self._errors("listing series"):
            found = self._client.search_for_series(
                search_filters=filters,
                fields=["SeriesDescription", "NumberOfSeriesRelatedInstances", "PatientID"],
                limit=limit,
            )
        return [_remote_series(item) for item in found]

    def check(self) -> None:
        """One cheap authenticated request; raises :class:`DicomwebError` when it fails."""
        with self._errors("checking the connection"):
            self._client.search_for_series(limit=1)

    def find_series(self, series_uid: str) -> RemoteSeries:
        """The series with ``series_uid``; 404 when the server has none."""
        with self._errors(f"looking up series {series_uid}"):
            found = self._client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})
        matches = [_remote_series(item) for item in found]
        matches = [m for m in matches if m.series_uid == series_uid]
        if not matches:
            raise DicomwebError(
                status.HTTP_404_NOT_FOUND,
                f"DICOMweb server {self.url} has no series {series_uid!r}",
            )
        return matches[0]

    def fetch_series(
        self, series: RemoteSeries, on_instance: Callable[[int, int], None] | None = None
    ) -> list[Dataset]:
        """Every instance of ``series`` (WADO-RS, one request per instance), in memory.

        Args:
            series: from :meth:`find_series`.
            on_instance: called with ``(instances fetched, total)`` after each instance.

        Raises:
            DicomwebError: a request failed (nothing is returned: the caller stores nothing).
        """
        with self._errors(f"listing the instances of series {series.series_uid}"):
            listed = self._client.search_for_instances(
                study_instance_uid=series.study_uid, series_instance_uid=series.series_uid
            )
        sop_uids = sorted({str(_value(item, "00080018")) for item in listed})
        datasets: list[Dataset] = []
        for k, sop_uid in enumerate(sop_uids, start=1):
            with self._errors(f"fetching instance {k}/{len(sop_uids)} of {series.series_uid}"):
                datasets.append(
                    self._client.retrieve_instance(
                        study_instance_uid=series.study_uid,
                        series_instance_uid=series.series_uid,
                        sop_instance_uid=sop_uid,
                    )
                )
            if on_instance is not None:
                on_instance(k, len(sop_uids))
        logger.info(
            "fetched %d instances of series %s from %s", len(datasets), series.series_uid, self.url
        )
        return datasets

    def store(self, datasets: list[Dataset]) -> None:
        """Store ``datasets`` on the server (STOW-RS); raises when any was refused."""
        with self._errors("storing DICOM objects (STOW-RS)"):
            answer = self._client.store_instances(datasets)
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            raise DicomwebError(
                status.HTTP_502_BAD_GATEWAY,
                f"DICOMweb server {self.url} refused {len(failed)} of {len(datasets)} objects"
                " (STOW-RS FailedSOPSequence)",
            )
        logger.info("stored %d DICOM objects on %s", len(datasets), self.url)
