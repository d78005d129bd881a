"""Fetches identities from a SPIFFE Workload API with the unmodified Python `spiffe` package (py-spiffe).

Used by the end-to-end tests: prints one JSON object with what it fetched, or exits non-zero with the error.
The socket comes from SPIFFE_ENDPOINT_SOCKET, as for any SPIFFE client.
"""

import json
import sys

from spiffe import WorkloadApiClient


def main() -> int:
    with WorkloadApiClient() as client:
        svid = client.fetch_x509_svid(timeout=10)
        ctx = client.fetch_x509_context(timeout=10)
        jwt = client.fetch_jwt_svid(audience={"python-test"}, timeout=10)
        jwt_bundles = client.fetch_jwt_bundles(timeout=10)
        validated = client.validate_jwt_svid(token=jwt.token, audience="python-test", timeout=10)
        print(
            json.dumps(
                {
                    "x509_spiffe_id": str(svid.spiffe_id),
                    "x509_chain_len": len(svid.cert_chain),
                    "bundle_trust_domains": sorted(str(td) for td in ctx.x509_bundle_set._bundles.keys())
                    if hasattr(ctx.x509_bundle_set, "_bundles")
                    else [],
                    "jwt_spiffe_id": str(jwt.spiffe_id),
                    "jwt_bundles": len(jwt_bundles._bundles) if hasattr(jwt_bundles, "_bundles") else -1,
                    "validated_spiffe_id": str(validated.spiffe_id),
                }
            )
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # report the client's own error text to the test
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
