"""Streams X.509 contexts from a SPIFFE Workload API with the unmodified Python `spiffe` package (py-spiffe).

Used by the end-to-end tests. Prints one JSON line per update the stream delivers,
`{"svids": [{"spiffe_id": ..., "not_before": <unix>, "not_after": <unix>}, ...]}`, and `{"error": "..."}` when the
stream fails (it does not reconnect). Runs until its stdin closes (the test drops it) or 600 s pass. The socket
comes from SPIFFE_ENDPOINT_SOCKET, as for any SPIFFE client.
"""

import json
import sys
import threading

from spiffe import WorkloadApiClient

_lock = threading.Lock()


def _emit(obj: object) -> None:
    with _lock:
        print(json.dumps(obj), flush=True)


def _on_update(ctx) -> None:
    _emit(
        {
            "svids": [
                {
                    "spiffe_id": str(svid.spiffe_id),
                    "not_before": int(svid.leaf.not_valid_before_utc.timestamp()),
                    "not_after": int(svid.leaf.not_valid_after_utc.timestamp()),
                }
                for svid in ctx.x509_svids
            ]
        }
    )


def _on_error(err: Exception) -> None:
    _emit({"error": f"{type(err).__name__}: {err}"})


def main() -> int:
    with WorkloadApiClient() as client:
        handle = client.stream_x509_contexts(_on_update, _on_error, retry_connect=False)
        done = threading.Event()
        threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
        done.wait(timeout=600)
        handle.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
