-- v1 (SQLite): counters, entries, join tokens, nodes, CA keys, issuance record.
CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta (name, value) VALUES ('entries_revision', 0), ('bundle_sequence', 0);

CREATE TABLE entries (
    id TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, parent_id TEXT NOT NULL,
    selectors TEXT NOT NULL, selector_key TEXT NOT NULL,
    x509_svid_ttl INTEGER NOT NULL, jwt_svid_ttl INTEGER NOT NULL, dns_names TEXT NOT NULL,
    admin INTEGER NOT NULL, revision INTEGER NOT NULL, created_at INTEGER NOT NULL,
    UNIQUE (spiffe_id, parent_id, selector_key));
CREATE INDEX entries_parent ON entries (parent_id);

CREATE TABLE join_tokens (token TEXT PRIMARY KEY, agent_spiffe_id TEXT NOT NULL,
    expires_at INTEGER NOT NULL, created_at INTEGER NOT NULL);

CREATE TABLE nodes (spiffe_id TEXT PRIMARY KEY, attestation_type TEXT NOT NULL, serial TEXT NOT NULL,
    expires_at INTEGER NOT NULL, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);

CREATE TABLE ca_keys (id TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL, key_type TEXT NOT NULL,
    key_ref TEXT NOT NULL, certificate BLOB, public_key_spki BLOB NOT NULL, not_before INTEGER NOT NULL,
    not_after INTEGER NOT NULL, created_at INTEGER NOT NULL, activated_at INTEGER, retired_at INTEGER);
CREATE UNIQUE INDEX ca_keys_one_prepared ON ca_keys (kind) WHERE state = 'prepared';
CREATE UNIQUE INDEX ca_keys_one_active ON ca_keys (kind) WHERE state = 'active';

CREATE TABLE issued (serial TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, kind TEXT NOT NULL,
    issued_at INTEGER NOT NULL, not_after INTEGER NOT NULL, signing_key_id TEXT NOT NULL,
    requested_by TEXT NOT NULL);
CREATE INDEX issued_by_id ON issued (spiffe_id, issued_at);
CREATE INDEX issued_by_key ON issued (signing_key_id, not_after);
