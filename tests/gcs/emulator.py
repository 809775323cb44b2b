"""gcp-storage-emulator (in memory, 127.0.0.1 only) with the fixes a GCS client test needs.

Stock gcp-storage-emulator 2026.7.19 lacks, and this adds:
  - objects.list startOffset/endOffset (tensorstore lists with them and no prefix: without
    them a kvstore list returns, and delete_range deletes, the whole bucket);
  - x-goog-generation / x-goog-metageneration headers on media reads (tensorstore's
    read stamps; without them every generation reads as 0);
  - ifGenerationMatch / ifGenerationNotMatch preconditions (412 / 304) on upload, read
    and delete (tensorstore / OCDBT conditional writes);
  - https:// upload Locations for requests that came through tlsproxy.py;
  - empty and JSON bodies of media uploads stored as bytes (stock: a TypeError, or a dict);
  - GET b/{bucket}/storageLayout (TF asks it before renaming a directory);
  - chunked request bodies decoded even when Content-Length is also sent (TF does);
  - HTTP/1.1 with 100-continue and Connection: close (stock: a 1 s stall per upload);
  - a listen backlog of 128 instead of 5 (concurrent clients stall otherwise).
And, for tests:
  - ``POST /_fault?match=SUBSTRING&status=412&count=N``: the next N uploads of an object
    whose name contains SUBSTRING fail with that status (``DELETE /_fault`` clears);
  - ``GET /_stats``: every request so far, ``[method, path, upload bytes]`` (uploads
    only), and ``DELETE /_stats`` clears them.
Usage: python emulator.py PORT BUCKET [BUCKET...] [-v]
"""

import json
import logging
import sys
import time
import urllib.parse
from http import HTTPStatus
from http import server as _http

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _q(request, key):
    v = request.query.get(key)
    return v[0] if v else None


def _current_generation(storage, bucket, name):
    try:
        return int(storage.get_file_obj(bucket, name)["generation"])
    except (NotFound, KeyError, TypeError):
        return 0


def _precondition(request, response, storage, bucket, name, read=False):
    """False (and the status set) if ifGenerationMatch / ifGenerationNotMatch fail."""
    if name is None:
        return True
    match, not_match = _q(request, "ifGenerationMatch"), _q(request, "ifGenerationNotMatch")
    if match is None and not_match is None:
        return True
    gen = _current_generation(storage, bucket, name)
    if match is not None and int(match) != gen:
        if read and gen == 0:
            response.status = HTTPStatus.NOT_FOUND
        else:
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json({"error": {"code": 412, "message": "Precondition Failed"}})
        return False
    if not_match is not None and int(not_match) == gen:
        if read:
            response.status = HTTPStatus.NOT_MODIFIED
        else:
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json({"error": {"code": 412, "message": "Precondition Failed"}})
        return False
    return True


class _Filtered:
    """Wraps a response: list results filtered to [startOffset, endOffset)."""

    def __init__(self, response, lo, hi):
        object.__setattr__(self, "_r", response)
        object.__setattr__(self, "_lo", lo)
        object.__setattr__(self, "_hi", hi)

    def json(self, obj):
        def keep(name):
            return (self._lo is None or name >= self._lo) and (self._hi is None or name < self._hi)

        obj["items"] = [o for o in obj.get("items") or [] if keep(o.get("name", ""))]
        obj["prefixes"] = [p for p in obj.get("prefixes") or [] if keep(p)]
        return self._r.json(obj)

    def __getattr__(self, name):
        return getattr(self._r, name)

    def __setattr__(self, name, value):
        setattr(self._r, name, value)


_ls, _insert, _upload_partial = objects.ls, objects.insert, objects.upload_partial
_xml_upload = objects.xml_upload
_download, _get, _delete = objects.download, objects.get, objects.delete


def ls(request, response, storage, *a, **k):
    lo, hi = _q(request, "startOffset"), _q(request, "endOffset")
    return _ls(request, _Filtered(response, lo, hi), storage, *a, **k)


def _raw_body(request):
    """The body as bytes, b"" when empty (stock: None, then len(None) fails on TF's
    empty directory-marker uploads; and a JSON body is parsed into a dict)."""
    from gcp_storage_emulator import server as s

    h = request._request_handler
    request._data = s._decode_raw_data(s._read_raw_data(h), h) or b""


FAULTS: list[dict] = []  # {"match", "status", "count"}
STATS: list[list] = []  # [method, path, upload bytes or None]


def _faulted(response, name) -> bool:
    """True (and the status set) if an injected fault matches this upload."""
    for fault in FAULTS:
        if name and fault["match"] in name and fault["count"] > 0:
            fault["count"] -= 1
            response.status = HTTPStatus(fault["status"])
            response.json({"error": {"code": fault["status"], "message": "injected fault"}})
            return True
    return False


def _record_upload(request, name, data=None):
    """An upload's object name and bytes; a resumable upload's start (no data yet) is
    recorded as UPLOAD-START, its data as UPLOAD."""
    if data is None:
        data = getattr(request, "_data", None)
    if _q(request, "uploadType") == "resumable" and request.method == "POST":
        STATS.append(["UPLOAD-START", name, None])
    else:
        size = len(data) if isinstance(data, (bytes, bytearray)) else 0
        STATS.append(["UPLOAD", name, size])


def insert(request, response, storage, *a, **k):
    if _q(request, "uploadType") == "media":
        _raw_body(request)
    name = _q(request, "name")
    if name is None and isinstance(getattr(request, "data", None), dict):
        name = (request.data.get("meta") or request.data).get("name")
    if _faulted(response, name):
        return
    _record_upload(request, name)
    if not _precondition(request, response, storage, request.params["bucket_name"], name):
        return
    return _insert(request, response, storage, *a, **k)


def upload_partial(request, response, storage, *a, **k):
    name = _q(request, "name")
    if name is None:  # a resumable upload's data: named by its upload id
        try:
            name = storage.get_resumable_file_obj(_q(request, "upload_id"))["name"]
        except (NotFound, KeyError, TypeError):
            name = None
    if _faulted(response, name):
        return
    _record_upload(request, name, request.data or b"")
    if not _precondition(request, response, storage, request.params["bucket_name"], name):
        return
    return _upload_partial(request, response, storage, *a, **k)


def download(request, response, storage, *a, **k):
    bucket, name = request.params["bucket_name"], request.params["object_id"]
    if not _precondition(request, response, storage, bucket, name, read=True):
        return
    try:
        obj = storage.get_file_obj(bucket, name)
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", 1))
        response["x-goog-stored-content-length"] = str(obj.get("size", ""))
    except NotFound:
        pass
    return _download(request, response, storage, *a, **k)


def get(request, response, storage, *a, **k):
    if _q(request, "alt") == "media":
        return download(request, response, storage, *a, **k)
    bucket, name = request.params["bucket_name"], request.params["object_id"]
    if not _precondition(request, response, storage, bucket, name, read=True):
        return
    return _get(request, response, storage, *a, **k)


def delete(request, response, storage, *a, **k):
    bucket, name = request.params["bucket_name"], request.params["object_id"]
    if not _precondition(request, response, storage, bucket, name):
        return
    return _delete(request, response, storage, *a, **k)


def xml_upload(request, response, storage, *a, **k):
    _raw_body(request)
    name = request.params.get("object_id")
    if _faulted(response, name):
        return
    _record_upload(request, name)
    return _xml_upload(request, response, storage, *a, **k)


objects.xml_upload = xml_upload
objects.ls, objects.insert, objects.upload_partial = ls, insert, upload_partial
objects.download, objects.get, objects.delete = download, get, delete
_http.HTTPServer.request_queue_size = 128
from gcp_storage_emulator import server as _server  # noqa: E402  (after the patches)
from gcp_storage_emulator.server import create_server  # noqa: E402

_request_init = _server.Request.__init__


def _request_init_https(self, handler, method):
    """Requests that came through tlsproxy.py (Host *.googleapis.com) were HTTPS: the
    resumable-upload Location must say so, or the client's next PUT goes to port 80."""
    _request_init(self, handler, method)
    if not handler.path.startswith("/_"):
        STATS.append([method, urllib.parse.unquote(handler.path), None])
    if (handler.headers.get("Host") or "").split(":")[0].endswith(".googleapis.com"):
        self._base_url = self._base_url.replace("http://", "https://", 1)
        self._full_url = self._base_url + self._path


_server.Request.__init__ = _request_init_https
_stock_read_raw_data = _server._read_raw_data


def _read_raw_data(handler):
    """Transfer-Encoding: chunked wins over Content-Length (RFC 9112 6.3). TensorFlow's
    uploads send both; stock reads Content-Length bytes of the chunked framing and
    stores '33\\r\\n' + the first bytes of the data."""
    if (handler.headers.get("Transfer-Encoding") or "").lower() == "chunked":
        data = b""
        while True:
            line = handler.rfile.readline().strip().split(b";")[0]
            size = int(line, 16) if line else 0
            if size == 0:
                while handler.rfile.readline().strip():  # trailers, then the blank line
                    pass
                return data
            data += handler.rfile.read(size)
            handler.rfile.readline()
    return _stock_read_raw_data(handler)


_server._read_raw_data = _read_raw_data

# HTTP/1.1 so that "Expect: 100-continue" is answered at once (stock HTTP/1.0: libcurl
# waits 1 s before every upload body: TF's and tensorstore's), one request per connection
# (the server is single-threaded: an idle keep-alive connection would block the others).
_server.RequestHandler.protocol_version = "HTTP/1.1"
_response_close = _server.Response.close


def _close_with_connection_close(self):
    self._headers["Connection"] = "close"
    return _response_close(self)


_server.Response.close = _close_with_connection_close


def storage_layout(request, response, storage, *a, **k):
    """GET b/{bucket}/storageLayout: a flat (non-HNS) bucket. TensorFlow's gs:// asks
    before renaming a directory; stock 404 -> tf.io.gfile.rename(dir) fails."""
    name = request.params["bucket_name"]
    if name not in storage.buckets:
        response.status = HTTPStatus.NOT_FOUND
        return
    response.json(
        {
            "kind": "storage#storageLayout",
            "bucket": name,
            "location": "US",
            "locationType": "multi-region",
            "hierarchicalNamespace": {"enabled": False},
        }
    )


def fault(request, response, storage, *a, **k):
    if request.method == "DELETE":
        FAULTS.clear()
    else:
        FAULTS.append(
            dict(
                match=_q(request, "match"),
                status=int(_q(request, "status") or 503),
                count=int(_q(request, "count") or 1),
            )
        )
    response.json({"faults": FAULTS})


def stats(request, response, storage, *a, **k):
    if request.method == "DELETE":
        STATS.clear()
    response.write(json.dumps(STATS))


_server.HANDLERS = (
    (r"^/_fault$", {"POST": fault, "DELETE": fault}),
    (r"^/_stats$", {"GET": stats, "DELETE": stats}),
    (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/storageLayout$", {"GET": storage_layout}),
    *_server.HANDLERS,
)
from gcp_storage_emulator.handlers import buckets as _buckets  # noqa: E402

args = [a for a in sys.argv[1:] if a != "-v"]
logging.basicConfig(
    level=logging.INFO if "-v" in sys.argv else logging.WARNING, format="%(asctime)s %(message)s"
)
port, names = int(args[0]), args[1:] or ["bucket"]
srv = create_server("127.0.0.1", port, in_memory=True, default_bucket=names[0])
srv.start()
for b in names[1:]:
    _buckets.create_bucket(b, srv._storage)
print(f"emulator on http://127.0.0.1:{port} buckets {names}", flush=True)
while True:
    time.sleep(3600)
