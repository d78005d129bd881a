//! One behaviour suite, run against SQLite always and against PostgreSQL when `TRUSTLINE_TEST_POSTGRES` holds a
//! conninfo (e.g. `host=127.0.0.1 port=5432 user=postgres dbname=postgres`; scripts/test.sh starts a real server
//! and sets it). Each PostgreSQL run works in its own fresh schema, dropped afterwards.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;

use super::*;

fn sel(s: &str) -> Selector {
    s.parse().unwrap()
}

fn entry(id: &str, spiffe: &str, parent: &str, sels: &[&str]) -> Entry {
    Entry {
        id: id.into(),
        spiffe_id: spiffe.into(),
        parent_id: parent.into(),
        selectors: sels.iter().map(|s| sel(s)).collect(),
        x509_svid_ttl: 0,
        jwt_svid_ttl: 0,
        dns_names: vec!["a.example.org".into()],
        admin: false,
        revision: 0,
        created_at: 100,
    }
}

fn key(id: &str, kind: KeyKind, state: KeyState, created: i64) -> CaKeyRecord {
    CaKeyRecord {
        id: id.into(),
        kind,
        state,
        key_type: "ec-p256".into(),
        key_ref: "soft:v1:xxx".into(),
        certificate: (kind == KeyKind::X509).then(|| vec![1, 2, 3]),
        public_key_spki: vec![4, 5, 6],
        not_before: 0,
        not_after: 1000,
        created_at: created,
        activated_at: None,
        retired_at: None,
    }
}

fn issued(serial: &str, key: &str, at: i64, not_after: i64) -> IssuedRecord {
    IssuedRecord {
        serial: serial.into(),
        spiffe_id: "spiffe://example.org/w".into(),
        kind: KeyKind::X509,
        issued_at: at,
        not_after,
        signing_key_id: key.into(),
        requested_by: "admin".into(),
    }
}

fn is_backend_error(e: &StoreError) -> bool {
    matches!(e, StoreError::Sqlite { .. } | StoreError::Postgres(_))
}

/// Everything a single CA sees, against any backend. Expects an empty, freshly migrated store.
async fn suite(s: &Store) {
    assert_eq!(s.schema_version().await.unwrap(), SCHEMA_VERSION);
    entries(s).await;
    join_tokens(s).await;
    nodes(s).await;
    ca_keys(s).await;
    issuance_record(s).await;
}

async fn entries(s: &Store) {
    let r0 = s.entries_revision().await.unwrap();
    assert!(s.get_entry("a").await.unwrap().is_none());
    assert!(s.list_entries(&EntryFilter::default()).await.unwrap().is_empty());

    // Create: selectors stored canonically, revision bumped and reported.
    let mut a_in = entry(
        "a",
        "spiffe://example.org/web",
        "spiffe://example.org/n1",
        &["unix:uid:1", "unix:gid:2", "unix:uid:1"],
    );
    a_in.admin = true;
    a_in.dns_names = vec!["web.example.org".into(), "web".into()];
    a_in.jwt_svid_ttl = 30;
    let a = s.create_entry(&a_in).await.unwrap();
    assert_eq!(a.revision, r0 + 1);
    assert_eq!(s.entries_revision().await.unwrap(), a.revision);
    assert_eq!(
        a.selectors,
        vec![sel("unix:gid:2"), sel("unix:uid:1")],
        "stored sorted and deduplicated"
    );
    assert_eq!(s.get_entry("a").await.unwrap().unwrap(), a, "round trip");

    // Duplicate: same SPIFFE ID, parent and selector set in another order; nothing changes.
    let dup = s
        .create_entry(&entry(
            "b",
            "spiffe://example.org/web",
            "spiffe://example.org/n1",
            &["unix:gid:2", "unix:uid:1"],
        ))
        .await
        .unwrap_err();
    match &dup {
        StoreError::DuplicateEntry {
            existing_id,
            spiffe_id,
            parent_id,
        } => {
            assert_eq!(existing_id, "a");
            assert_eq!(spiffe_id, "spiffe://example.org/web");
            assert_eq!(parent_id, "spiffe://example.org/n1");
        }
        other => panic!("{other:?}"),
    }
    assert!(dup.to_string().contains("(id a)"), "{dup}");
    assert_eq!(
        s.entries_revision().await.unwrap(),
        a.revision,
        "failed create changed nothing"
    );
    assert!(s.get_entry("b").await.unwrap().is_none());

    // A different selector set (a subset) or parent is not a duplicate.
    let mut c = entry(
        "c",
        "spiffe://example.org/web",
        "spiffe://example.org/n1",
        &["unix:uid:1"],
    );
    c.created_at = 150;
    let c = s.create_entry(&c).await.unwrap();
    let mut b = entry(
        "b",
        "spiffe://example.org/db",
        "spiffe://example.org/n2",
        &["unix:uid:5"],
    );
    b.created_at = 200;
    let b = s.create_entry(&b).await.unwrap();
    assert!(b.revision > c.revision && c.revision > a.revision);

    // A reused id with different content is refused (not as a duplicate entry) and changes nothing.
    let reused = s
        .create_entry(&entry(
            "a",
            "spiffe://example.org/other",
            "spiffe://example.org/n9",
            &["unix:uid:9"],
        ))
        .await
        .unwrap_err();
    assert!(is_backend_error(&reused), "{reused:?}");
    assert_eq!(s.get_entry("a").await.unwrap().unwrap(), a);
    assert_eq!(s.entries_revision().await.unwrap(), b.revision);

    // Listing and filters, ordered by created_at then id.
    assert_eq!(
        s.list_entries(&EntryFilter::default()).await.unwrap(),
        vec![a.clone(), c.clone(), b.clone()]
    );
    assert_eq!(
        s.list_entries_by_parent("spiffe://example.org/n2").await.unwrap(),
        vec![b.clone()]
    );
    assert!(s
        .list_entries_by_parent("spiffe://example.org/none")
        .await
        .unwrap()
        .is_empty());
    let by_sel = |x: &str| EntryFilter {
        selector: Some(sel(x)),
        ..Default::default()
    };
    assert_eq!(
        s.list_entries(&by_sel("unix:uid:1")).await.unwrap(),
        vec![a.clone(), c.clone()]
    );
    assert_eq!(
        s.list_entries(&by_sel("unix:gid:2")).await.unwrap(),
        vec![a.clone()]
    );
    assert!(s.list_entries(&by_sel("unix:uid:2")).await.unwrap().is_empty());
    assert_eq!(
        s.list_entries(&EntryFilter {
            spiffe_id: Some("spiffe://example.org/web".into()),
            parent_id: Some("spiffe://example.org/n1".into()),
            selector: Some(sel("unix:gid:2")),
        })
        .await
        .unwrap(),
        vec![a.clone()]
    );
    assert_eq!(
        s.list_entries(&EntryFilter {
            spiffe_id: Some("spiffe://example.org/db".into()),
            ..Default::default()
        })
        .await
        .unwrap(),
        vec![b.clone()]
    );

    // Update: by id, keeps created_at, bumps the revision.
    let mut changed = b.clone();
    changed.x509_svid_ttl = 60;
    changed.selectors = vec![sel("unix:uid:6"), sel("unix:uid:5")];
    changed.created_at = 999; // ignored: creation time is kept
    let updated = s.update_entry(&changed).await.unwrap();
    assert_eq!(updated.revision, b.revision + 1);
    assert_eq!(updated.created_at, 200);
    assert_eq!(updated.selectors, vec![sel("unix:uid:5"), sel("unix:uid:6")]);
    assert_eq!(s.get_entry("b").await.unwrap().unwrap(), updated);
    assert_eq!(s.entries_revision().await.unwrap(), updated.revision);

    // Update into a duplicate is refused and changes nothing.
    let mut clash = updated.clone();
    clash.spiffe_id = a.spiffe_id.clone();
    clash.parent_id = a.parent_id.clone();
    clash.selectors = vec![sel("unix:uid:1"), sel("unix:gid:2")];
    match s.update_entry(&clash).await {
        Err(StoreError::DuplicateEntry { existing_id, .. }) => assert_eq!(existing_id, "a"),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.get_entry("b").await.unwrap().unwrap(), updated);
    assert_eq!(s.entries_revision().await.unwrap(), updated.revision);

    // Updating an entry to its own identity is not a duplicate of itself.
    let again = s.update_entry(&updated).await.unwrap();
    assert_eq!(again.revision, updated.revision + 1);

    // Unknown ids.
    assert!(matches!(
        s.update_entry(&entry(
            "zz",
            "spiffe://example.org/x",
            "spiffe://example.org/n",
            &["unix:uid:1"]
        ))
        .await,
        Err(StoreError::EntryNotFound(ref id)) if id == "zz"
    ));
    assert_eq!(s.entries_revision().await.unwrap(), again.revision);

    // Delete returns the entry, bumps the revision, and frees the identity for a new entry.
    let deleted = s.delete_entry("a").await.unwrap();
    assert_eq!(deleted, a);
    assert_eq!(s.entries_revision().await.unwrap(), again.revision + 1);
    assert!(s.get_entry("a").await.unwrap().is_none());
    assert!(matches!(
        s.delete_entry("a").await,
        Err(StoreError::EntryNotFound(ref id)) if id == "a"
    ));
    assert_eq!(s.entries_revision().await.unwrap(), again.revision + 1);
    let mut a2 = a_in.clone();
    a2.id = "a2".into();
    let a2 = s.create_entry(&a2).await.unwrap();
    assert_eq!(a2.revision, again.revision + 2);
}

async fn join_tokens(s: &Store) {
    let t = JoinToken {
        token: "tok1".into(),
        agent_spiffe_id: "spiffe://example.org/agent".into(),
        expires_at: 1000,
        created_at: 0,
    };
    assert!(!s.is_agent_id(&t.agent_spiffe_id).await.unwrap());
    s.create_join_token(&t).await.unwrap();
    assert!(is_backend_error(&s.create_join_token(&t).await.unwrap_err()));
    // The agent ID an unspent token names is an agent's.
    assert!(s.is_agent_id(&t.agent_spiffe_id).await.unwrap());
    assert!(!s.is_agent_id("spiffe://example.org/web").await.unwrap());
    // What is stored is the digest, and the digest is not the token: presented, it is refused, in any case,
    // and the token is not spent.
    for stored in [token_digest("tok1"), token_digest("tok1").to_uppercase()] {
        let err = s.consume_join_token(&stored, 999).await.unwrap_err();
        assert!(matches!(err, StoreError::TokenInStoredForm), "{err:?}");
        assert!(!err.to_string().contains(&stored[7..]), "{err}");
    }
    // Used once, then gone.
    assert_eq!(s.consume_join_token("tok1", 999).await.unwrap(), t);
    assert!(!s.is_agent_id(&t.agent_spiffe_id).await.unwrap());
    assert!(matches!(
        s.consume_join_token("tok1", 10).await,
        Err(StoreError::TokenNotFound)
    ));
    assert!(matches!(
        s.consume_join_token("never", 10).await,
        Err(StoreError::TokenNotFound)
    ));
    // Expired: reported with its expiry, and deleted.
    s.create_join_token(&JoinToken {
        token: "tok2".into(),
        ..t.clone()
    })
    .await
    .unwrap();
    let err = s.consume_join_token("tok2", 1000).await.unwrap_err();
    assert!(
        matches!(err, StoreError::TokenExpired { expires_at: 1000 }),
        "{err:?}"
    );
    assert!(!err.to_string().contains("tok2"), "never echo the token");
    assert!(matches!(
        s.consume_join_token("tok2", 10).await,
        Err(StoreError::TokenNotFound)
    ));
    // Pruning removes only expired tokens.
    for (tok, exp) in [("tok3", 100), ("tok4", 200), ("tok5", 5000)] {
        s.create_join_token(&JoinToken {
            token: tok.into(),
            expires_at: exp,
            ..t.clone()
        })
        .await
        .unwrap();
    }
    assert_eq!(s.prune_join_tokens(200).await.unwrap(), 2);
    assert_eq!(s.prune_join_tokens(200).await.unwrap(), 0);
    assert_eq!(s.consume_join_token("tok5", 300).await.unwrap().expires_at, 5000);
}

async fn nodes(s: &Store) {
    let mut n = NodeRecord {
        spiffe_id: "spiffe://example.org/agent".into(),
        attestation_type: "join_token".into(),
        serial: "01".into(),
        expires_at: 10,
        created_at: 1,
        updated_at: 1,
    };
    assert!(!s.is_agent_id(&n.spiffe_id).await.unwrap());
    s.upsert_node(&n).await.unwrap();
    assert!(s.is_agent_id(&n.spiffe_id).await.unwrap());
    assert_eq!(s.get_node(&n.spiffe_id).await.unwrap().unwrap(), n);
    n.serial = "02".into();
    n.expires_at = 20;
    n.updated_at = 2;
    let mut again = n.clone();
    again.created_at = 2; // an upsert keeps the first attestation time
    s.upsert_node(&again).await.unwrap();
    assert_eq!(s.get_node(&n.spiffe_id).await.unwrap().unwrap(), n);
    assert!(s.get_node("spiffe://example.org/none").await.unwrap().is_none());
}

async fn ca_keys(s: &Store) {
    assert!(s.list_ca_keys().await.unwrap().is_empty());
    let seq0 = s.bundle_sequence().await.unwrap();
    let k1 = key("k1", KeyKind::X509, KeyState::Prepared, 1);
    s.insert_ca_key(&k1).await.unwrap();
    assert_eq!(s.bundle_sequence().await.unwrap(), seq0 + 1);
    assert_eq!(s.list_ca_keys().await.unwrap(), vec![k1.clone()], "round trip");

    // One prepared key per kind; refusal changes nothing.
    let err = s
        .insert_ca_key(&key("k2", KeyKind::X509, KeyState::Prepared, 2))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::KeySlotTaken {
                kind: "x509",
                state: "prepared"
            }
        ),
        "{err:?}"
    );
    assert_eq!(s.bundle_sequence().await.unwrap(), seq0 + 1);
    // A reused id is not a slot problem.
    let err = s
        .insert_ca_key(&key("k1", KeyKind::Jwt, KeyState::Old, 2))
        .await
        .unwrap_err();
    assert!(is_backend_error(&err), "{err:?}");
    s.insert_ca_key(&key("j1", KeyKind::Jwt, KeyState::Prepared, 3))
        .await
        .unwrap();
    assert_eq!(s.bundle_sequence().await.unwrap(), seq0 + 2);

    // Activation: wrong kind or unknown id loses; the first activation wins, a second one loses.
    assert!(!s.activate_ca_key(KeyKind::Jwt, "k1", 50).await.unwrap());
    assert!(!s.activate_ca_key(KeyKind::X509, "nope", 50).await.unwrap());
    assert_eq!(s.bundle_sequence().await.unwrap(), seq0 + 2);
    assert!(s.activate_ca_key(KeyKind::X509, "k1", 50).await.unwrap());
    assert_eq!(s.bundle_sequence().await.unwrap(), seq0 + 3);
    assert!(
        !s.activate_ca_key(KeyKind::X509, "k1", 51).await.unwrap(),
        "second activation loses the race"
    );
    assert_eq!(s.bundle_sequence().await.unwrap(), seq0 + 3);
    // One active key per kind.
    let err = s
        .insert_ca_key(&key("kx", KeyKind::X509, KeyState::Active, 4))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::KeySlotTaken {
                kind: "x509",
                state: "active"
            }
        ),
        "{err:?}"
    );

    // Rotation: the next prepared key takes over, the active one becomes old.
    s.insert_ca_key(&key("k2", KeyKind::X509, KeyState::Prepared, 4))
        .await
        .unwrap();
    let seq1 = s.bundle_sequence().await.unwrap();
    assert!(s.activate_ca_key(KeyKind::X509, "k2", 60).await.unwrap());
    assert_eq!(s.bundle_sequence().await.unwrap(), seq1 + 1);
    let keys = s.list_ca_keys().await.unwrap();
    let states: Vec<_> = keys.iter().map(|k| (k.id.as_str(), k.state)).collect();
    assert_eq!(
        states,
        vec![
            ("k1", KeyState::Old),
            ("j1", KeyState::Prepared),
            ("k2", KeyState::Active)
        ]
    );
    assert_eq!(keys[0].activated_at, Some(50));
    assert_eq!(keys[2].activated_at, Some(60));
    assert_eq!(keys[0].certificate, Some(vec![1, 2, 3]));
    assert_eq!(keys[1].certificate, None);

    // Retirement: only old keys; unknown or not-old keys are KeyNotFound and change nothing.
    s.retire_ca_key("k1", 70).await.unwrap();
    assert_eq!(s.bundle_sequence().await.unwrap(), seq1 + 2);
    for id in ["k1", "k2", "nope"] {
        assert!(matches!(
            s.retire_ca_key(id, 71).await,
            Err(StoreError::KeyNotFound(ref x)) if x == id
        ));
    }
    assert_eq!(s.bundle_sequence().await.unwrap(), seq1 + 2);
    let k1 = &s.list_ca_keys().await.unwrap()[0];
    assert_eq!((k1.state, k1.retired_at), (KeyState::Retired, Some(70)));

    // Same created_at: insertion order.
    s.insert_ca_key(&key("t2", KeyKind::Jwt, KeyState::Old, 4))
        .await
        .unwrap();
    s.insert_ca_key(&key("t1", KeyKind::Jwt, KeyState::Old, 4))
        .await
        .unwrap();
    let ids: Vec<_> = s
        .list_ca_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(ids, ["k1", "j1", "k2", "t2", "t1"]);
}

async fn issuance_record(s: &Store) {
    s.record_issued(&[]).await.unwrap();
    s.record_issued(&[
        issued("s1", "k2", 10, 100),
        issued("s2", "k2", 11, 300),
        issued("s3", "k1", 12, 200),
    ])
    .await
    .unwrap();
    // A serial already recorded fails the whole batch.
    let err = s
        .record_issued(&[issued("s4", "k2", 13, 900), issued("s1", "k2", 13, 900)])
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::DuplicateSerial(ref x) if x == "s1"),
        "{err:?}"
    );
    // So does a serial repeated inside the batch.
    let err = s
        .record_issued(&[issued("s5", "k2", 13, 900), issued("s5", "k2", 13, 900)])
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::DuplicateSerial(ref x) if x == "s5"),
        "{err:?}"
    );
    let all = s.list_issued(&IssuedFilter::default()).await.unwrap();
    let serials: Vec<_> = all.iter().map(|r| r.serial.as_str()).collect();
    assert_eq!(serials, ["s3", "s2", "s1"], "failed batches left nothing behind");
    assert_eq!(s.max_not_after_signed_by("k2").await.unwrap(), Some(300));

    // Filters, kinds, ties in issued_at (newest insert first), limits.
    let mut jwt = issued("jti-1", "j1", 12, 150);
    jwt.kind = KeyKind::Jwt;
    jwt.spiffe_id = "spiffe://example.org/other".into();
    jwt.requested_by = "spiffe://example.org/agent".into();
    s.record_issued(std::slice::from_ref(&jwt)).await.unwrap();
    let one = s
        .list_issued(&IssuedFilter {
            serial: Some("s2".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(one, vec![issued("s2", "k2", 11, 300)]);
    let other = s
        .list_issued(&IssuedFilter {
            spiffe_id: Some("spiffe://example.org/other".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(other, vec![jwt.clone()]);
    let newest = s
        .list_issued(&IssuedFilter {
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    let serials: Vec<_> = newest.iter().map(|r| r.serial.as_str()).collect();
    assert_eq!(serials, ["jti-1", "s3"]);
    assert!(s
        .list_issued(&IssuedFilter {
            serial: Some("none".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .is_empty());

    // The default limit is 100.
    let many: Vec<_> = (0..150)
        .map(|i| issued(&format!("m{i:03}"), "k2", 1000 + i, 500))
        .collect();
    s.record_issued(&many).await.unwrap();
    let page = s.list_issued(&IssuedFilter::default()).await.unwrap();
    assert_eq!(page.len(), 100);
    assert_eq!(page[0].serial, "m149");
    assert_eq!(
        s.list_issued(&IssuedFilter {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .len(),
        154
    );

    assert_eq!(s.max_not_after_signed_by("k2").await.unwrap(), Some(500));
    assert_eq!(s.max_not_after_signed_by("k1").await.unwrap(), Some(200));
    assert_eq!(s.max_not_after_signed_by("none").await.unwrap(), None);
}

/// Several CA replicas (separate connections) on one database: racing writers, exactly one wins each race.
async fn replicas(a: Arc<Store>, b: Arc<Store>) {
    for round in 0..5 {
        let id = format!("race{round}");
        a.insert_ca_key(&key(&id, KeyKind::Jwt, KeyState::Prepared, 100 + round))
            .await
            .unwrap();
        let (ra, rb) = {
            let (a, b, ia, ib) = (a.clone(), b.clone(), id.clone(), id.clone());
            tokio::join!(
                tokio::spawn(async move { a.activate_ca_key(KeyKind::Jwt, &ia, 1).await }),
                tokio::spawn(async move { b.activate_ca_key(KeyKind::Jwt, &ib, 2).await })
            )
        };
        let (ra, rb) = (ra.unwrap().unwrap(), rb.unwrap().unwrap());
        assert!(ra ^ rb, "exactly one replica activates {id}: {ra} {rb}");
        let active: Vec<_> = b
            .list_ca_keys()
            .await
            .unwrap()
            .into_iter()
            .filter(|k| k.kind == KeyKind::Jwt && k.state == KeyState::Active)
            .collect();
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].id, id);

        let serial = format!("race-serial-{round}");
        let (ra, rb) = {
            let (a, b) = (a.clone(), b.clone());
            let (ba, bb) = (
                vec![
                    issued(&serial, &id, 1, 1),
                    issued(&format!("{serial}-a"), &id, 1, 1),
                ],
                vec![
                    issued(&format!("{serial}-b"), &id, 1, 1),
                    issued(&serial, &id, 1, 1),
                ],
            );
            tokio::join!(
                tokio::spawn(async move { a.record_issued(&ba).await }),
                tokio::spawn(async move { b.record_issued(&bb).await })
            )
        };
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert!(ra.is_ok() ^ rb.is_ok(), "{ra:?} {rb:?}");
        let loser = if ra.is_ok() { rb } else { ra };
        assert!(
            matches!(loser, Err(StoreError::DuplicateSerial(ref x)) if *x == serial),
            "{loser:?}"
        );
        let found = a
            .list_issued(&IssuedFilter {
                spiffe_id: Some("spiffe://example.org/w".into()),
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap();
        let n = found.iter().filter(|r| r.serial.starts_with(&serial)).count();
        assert_eq!(n, 2, "the losing batch left nothing behind");

        let token = format!("race-token-{round}");
        a.create_join_token(&JoinToken {
            token: token.clone(),
            agent_spiffe_id: "spiffe://example.org/agent".into(),
            expires_at: 10,
            created_at: 0,
        })
        .await
        .unwrap();
        let (ra, rb) = {
            let (a, b, ta, tb) = (a.clone(), b.clone(), token.clone(), token.clone());
            tokio::join!(
                tokio::spawn(async move { a.consume_join_token(&ta, 1).await }),
                tokio::spawn(async move { b.consume_join_token(&tb, 1).await })
            )
        };
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert!(
            ra.is_ok() ^ rb.is_ok(),
            "a join token is used once: {ra:?} {rb:?}"
        );
    }
    assert_eq!(
        a.bundle_sequence().await.unwrap(),
        b.bundle_sequence().await.unwrap()
    );
}

fn sqlite(path: &std::path::Path) -> StoreConfig {
    StoreConfig::Sqlite {
        path: path.to_owned(),
    }
}

#[tokio::test]
async fn sqlite_store_behaves() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/ca.db");
    let s = Store::open(&sqlite(&path)).await.unwrap();
    suite(&s).await;
    let entries = s.list_entries(&EntryFilter::default()).await.unwrap();
    let keys = s.list_ca_keys().await.unwrap();
    let (rev, seq) = (
        s.entries_revision().await.unwrap(),
        s.bundle_sequence().await.unwrap(),
    );
    drop(s);

    // Reopen: everything is still there and the migration is not re-applied.
    let s = Store::open(&sqlite(&path)).await.unwrap();
    assert_eq!(s.list_entries(&EntryFilter::default()).await.unwrap(), entries);
    assert_eq!(s.list_ca_keys().await.unwrap(), keys);
    assert_eq!(s.entries_revision().await.unwrap(), rev);
    assert_eq!(s.bundle_sequence().await.unwrap(), seq);
    assert_eq!(s.schema_version().await.unwrap(), SCHEMA_VERSION);
    drop(s);

    let raw = rusqlite::Connection::open(&path).unwrap();
    let (journal, migrations): (String, i64) = (
        raw.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap(),
        raw.query_row("SELECT COUNT(*) FROM schema_migrations", [], |r| r.get(0))
            .unwrap(),
    );
    assert_eq!(journal, "wal");
    assert_eq!(migrations, SCHEMA_VERSION);

    // A database from the future is refused, and left as it was.
    raw.execute(
        "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, 0)",
        [SCHEMA_VERSION + 1],
    )
    .unwrap();
    drop(raw);
    let err = Store::open(&sqlite(&path)).await.unwrap_err();
    match err {
        StoreError::SchemaTooNew { found, supported } => {
            assert_eq!((found, supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
        }
        other => panic!("{other:?}"),
    }
    assert!(Store::open(&sqlite(&path)).await.is_err(), "still refused");
}

#[tokio::test]
async fn sqlite_reports_unopenable_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let err = Store::open(&sqlite(&file.join("ca.db"))).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Sqlite { .. } | StoreError::Io { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("ca.db"), "{err}");
}

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn chmod(p: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The database, its -wal and -shm files and the folders made for them are private to the CA's user; a database
/// file others can read is refused, named with its mode, and left as it was. (Before: the umask decided, 0644
/// and 0755 under the usual 022, and any mode was accepted.)
#[tokio::test]
async fn sqlite_files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new/data/ca.db");
    let s = Store::open(&sqlite(&path)).await.unwrap();
    s.create_join_token(&JoinToken {
        token: "t".into(),
        agent_spiffe_id: String::new(),
        expires_at: 10,
        created_at: 0,
    })
    .await
    .unwrap();
    assert_eq!(mode(&dir.path().join("new")), 0o700);
    assert_eq!(mode(&dir.path().join("new/data")), 0o700);
    let [db, wal, shm, _] = crate::private_files::sqlite_files(&path);
    for f in [&db, &wal, &shm] {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    // A second store on the same (private) files opens.
    drop(Store::open(&sqlite(&path)).await.unwrap());

    for f in [&db, &wal, &shm] {
        for loose in [0o644, 0o640, 0o604] {
            chmod(f, loose);
            let err = Store::open(&sqlite(&path)).await.unwrap_err();
            assert!(
                matches!(&err, StoreError::FileMode { path, mode } if *path == f.display().to_string() && *mode == loose),
                "{err:?}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains(&f.display().to_string()) && msg.contains(&format!("mode {loose:o}")),
                "{msg}"
            );
            assert_eq!(mode(f), loose, "left as it was");
        }
        chmod(f, 0o600);
    }
    drop(s);
    // A stricter mode is fine.
    chmod(&db, 0o400);
    chmod(&db, 0o600);
    drop(Store::open(&sqlite(&path)).await.unwrap());
}

/// Rows an older version stored in clear: on open, each becomes its digest (and a derived agent ID, which holds
/// the token, becomes empty), so an unspent one still works, once, by its clear value, and the file no longer
/// holds it.
async fn clear_tokens_migrated(
    s: &Store,
    read_raw: impl std::future::Future<Output = Vec<(String, String)>>,
) {
    let rows = read_raw.await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    for (token, agent) in &rows {
        assert!(token.starts_with("sha256:"), "{token}");
        assert!(!agent.contains("clear"), "{agent}");
    }
    let named = s.consume_join_token("clear-named", 10).await.unwrap();
    assert_eq!(named.agent_spiffe_id, "spiffe://example.org/node/old");
    let derived = s.consume_join_token("clear-derived", 10).await.unwrap();
    assert_eq!(derived.agent_spiffe_id, "", "derived again by the CA");
    // Spent: once only. An expired one stays expired.
    assert!(matches!(
        s.consume_join_token("clear-named", 10).await,
        Err(StoreError::TokenNotFound)
    ));
    assert!(matches!(
        s.consume_join_token("clear-expired", 10).await,
        Err(StoreError::TokenExpired { expires_at: 5 })
    ));
}

const OLD_ROWS: [(&str, &str, i64); 3] = [
    ("clear-named", "spiffe://example.org/node/old", 1000),
    (
        "clear-derived",
        "spiffe://example.org/trustline/agent/join_token/clear-derived",
        1000,
    ),
    ("clear-expired", "spiffe://example.org/trustline/agent/x", 5),
];

#[tokio::test]
async fn sqlite_hashes_tokens_stored_in_clear() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca.db");
    drop(Store::open(&sqlite(&path)).await.unwrap());
    let raw = rusqlite::Connection::open(&path).unwrap();
    for (token, agent, exp) in OLD_ROWS {
        raw.execute(
            "INSERT INTO join_tokens (token, agent_spiffe_id, expires_at, created_at) VALUES (?1, ?2, ?3, 0)",
            rusqlite::params![token, agent, exp],
        )
        .unwrap();
    }
    drop(raw);
    let s = Store::open(&sqlite(&path)).await.unwrap();
    let files = crate::private_files::sqlite_files(&path);
    for f in &files {
        if let Ok(bytes) = std::fs::read(f) {
            assert!(
                !bytes
                    .windows(11)
                    .any(|w| w == b"clear-named" || w == b"clear-deriv"),
                "{} still holds a token in clear",
                f.display()
            );
        }
    }
    let read = async {
        let raw = rusqlite::Connection::open(&path).unwrap();
        let mut st = raw
            .prepare("SELECT token, agent_spiffe_id FROM join_tokens")
            .unwrap();
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        rows
    };
    clear_tokens_migrated(&s, read).await;
    // Opening again changes nothing more.
    drop(s);
    drop(Store::open(&sqlite(&path)).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_replicas_on_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca.db");
    let a = Arc::new(Store::open(&sqlite(&path)).await.unwrap());
    let b = Arc::new(Store::open(&sqlite(&path)).await.unwrap());
    replicas(a, b).await;
}

/// Records 50,000 SVIDs in batches of 500 (the CA's group commit) and prints the rate.
async fn record_issued_throughput(s: &Store, backend: &str) {
    let (batches, size) = (100, 500);
    let batch_of = |b: usize| -> Vec<IssuedRecord> {
        (0..size)
            .map(|i| IssuedRecord {
                serial: format!("{:032x}", b * size + i),
                spiffe_id: format!("spiffe://example.org/w/{}", i % 97),
                kind: KeyKind::X509,
                issued_at: (b * size + i) as i64,
                not_after: 3600,
                signing_key_id: "k".into(),
                requested_by: "spiffe://example.org/agent".into(),
            })
            .collect()
    };
    let all: Vec<_> = (0..batches).map(batch_of).collect();
    let start = std::time::Instant::now();
    for batch in &all {
        s.record_issued(batch).await.unwrap();
    }
    let elapsed = start.elapsed();
    let rate = (batches * size) as f64 / elapsed.as_secs_f64();
    println!(
        "{backend} record_issued: {} records in batches of {size}: {elapsed:?} ({rate:.0}/s)",
        batches * size
    );
    let newest = s
        .list_issued(&IssuedFilter {
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(newest[0].serial, format!("{:032x}", batches * size - 1));
}

#[tokio::test]
async fn sqlite_record_issued_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&sqlite(&dir.path().join("ca.db"))).await.unwrap();
    record_issued_throughput(&s, "sqlite").await;
}

/// Opens a store in a fresh schema of the test server, runs `test`, and drops the schema (even on failure).
async fn with_pg_schema<F, Fut>(conninfo: &str, test: F)
where
    F: FnOnce(tokio_postgres::Config, Arc<tokio_postgres::Client>, String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let schema = format!("tl_test_{}_{nanos}", std::process::id());
    let (admin, conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
    let mut config: tokio_postgres::Config = conninfo.parse().unwrap();
    config.options(format!("-c search_path={schema}"));
    let admin = Arc::new(admin);
    let result = AssertUnwindSafe(test(config, admin.clone(), schema.clone()))
        .catch_unwind()
        .await;
    admin
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn pg_conninfo() -> Option<String> {
    let conninfo = std::env::var("TRUSTLINE_TEST_POSTGRES").ok();
    if conninfo.is_none() {
        println!("skipped: TRUSTLINE_TEST_POSTGRES is not set (scripts/test.sh sets it)");
    }
    conninfo
}

#[tokio::test]
async fn postgres_store_behaves() {
    let Some(conninfo) = pg_conninfo() else {
        return;
    };
    with_pg_schema(&conninfo, |config, admin, schema| async move {
        let s = Store::Postgres(PgStore::open_config(config.clone(), None).await.unwrap());
        assert!(format!("{s:?}").contains("PgStore"));
        suite(&s).await;
        let entries = s.list_entries(&EntryFilter::default()).await.unwrap();
        let seq = s.bundle_sequence().await.unwrap();
        drop(s);

        // Reopen: data kept, migration not re-applied.
        let s = Store::Postgres(PgStore::open_config(config.clone(), None).await.unwrap());
        assert_eq!(s.list_entries(&EntryFilter::default()).await.unwrap(), entries);
        assert_eq!(s.bundle_sequence().await.unwrap(), seq);
        assert_eq!(s.schema_version().await.unwrap(), SCHEMA_VERSION);
        drop(s);

        // A database from the future is refused.
        admin
            .execute(
                &format!("INSERT INTO {schema}.schema_migrations (version, applied_at) VALUES ($1, 0)"),
                &[&(SCHEMA_VERSION + 1)],
            )
            .await
            .unwrap();
        match PgStore::open_config(config, None).await {
            Err(StoreError::SchemaTooNew { found, supported }) => {
                assert_eq!((found, supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
            }
            other => panic!("{other:?}"),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_on_one_database() {
    let Some(conninfo) = pg_conninfo() else {
        return;
    };
    with_pg_schema(&conninfo, |config, admin, schema| async move {
        // Replicas starting together migrate once.
        let (a, b, c) = tokio::join!(
            PgStore::open_config(config.clone(), None),
            PgStore::open_config(config.clone(), None),
            PgStore::open_config(config.clone(), None)
        );
        let (a, b) = (Store::Postgres(a.unwrap()), Store::Postgres(b.unwrap()));
        drop(c.unwrap());
        let n: i64 = admin
            .query_one(&format!("SELECT COUNT(*) FROM {schema}.schema_migrations"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, SCHEMA_VERSION);
        replicas(Arc::new(a), Arc::new(b)).await;
    })
    .await;
}

#[tokio::test]
async fn postgres_hashes_tokens_stored_in_clear() {
    let Some(conninfo) = pg_conninfo() else {
        return;
    };
    with_pg_schema(&conninfo, |config, admin, schema| async move {
        drop(PgStore::open_config(config.clone(), None).await.unwrap());
        for (token, agent, exp) in OLD_ROWS {
            admin
                .execute(
                    &format!(
                        "INSERT INTO {schema}.join_tokens (token, agent_spiffe_id, expires_at, created_at) \
                         VALUES ($1, $2, $3, 0)"
                    ),
                    &[&token, &agent, &exp],
                )
                .await
                .unwrap();
        }
        // Replicas starting together hash each row once.
        let (a, b) = tokio::join!(
            PgStore::open_config(config.clone(), None),
            PgStore::open_config(config.clone(), None)
        );
        drop(b.unwrap());
        let s = Store::Postgres(a.unwrap());
        let read = async {
            admin
                .query(
                    &format!("SELECT token, agent_spiffe_id FROM {schema}.join_tokens"),
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect()
        };
        clear_tokens_migrated(&s, read).await;
    })
    .await;
}

#[tokio::test]
async fn postgres_store_opens_from_conninfo_string() {
    let Some(conninfo) = pg_conninfo() else {
        return;
    };
    if conninfo.contains("://") {
        println!("skipped: needs a key=value conninfo to add options to");
        return;
    }
    // Through the public config path, in a schema of our own via the conninfo `options`.
    with_pg_schema(&conninfo, |_, _, schema| {
        let conninfo = format!("{conninfo} options='-c search_path={schema}'");
        async move {
            let s = Store::open(&StoreConfig::Postgres { conninfo, tls: None })
                .await
                .unwrap();
            assert_eq!(s.schema_version().await.unwrap(), SCHEMA_VERSION);
            assert_eq!(s.entries_revision().await.unwrap(), 0);
        }
    })
    .await;
}

#[tokio::test]
async fn postgres_record_issued_throughput() {
    let Some(conninfo) = pg_conninfo() else {
        return;
    };
    with_pg_schema(&conninfo, |config, _, _| async move {
        let s = Store::Postgres(PgStore::open_config(config, None).await.unwrap());
        record_issued_throughput(&s, "postgres").await;
    })
    .await;
}
